//! The supervisor actor: starts children from specs, restarts them by policy, publishes them.
//!
//! ## Messages
//! Timer wake-ups (`RestartDue`, `LivenessDue`), a failed start (`StartFailed`), dynamic
//! children (`Add`, `Remove`) and operator actions (`Control`). Children's exits arrive as
//! ractor supervision events.
//!
//! ## Supervision
//! Its parent is another supervisor (or nobody, for the root). Its children are whatever
//! its specs start; a child may itself be a supervisor ([`ChildSpec::supervisor`]).
//!
//! ## Restart policy
//! Of its children: every exit becomes an [`Exit`] and goes through [`decide`]. Exits the
//! supervisor causes itself (operator stop/restart/kill, a hung child's kill, a sibling
//! restart, shutdown) first *detach* the child's cell, so the late ractor event about it is
//! recognised as stale and ignored; a kill then goes through [`decide`] directly. Timer
//! messages carry a token, and a restart or stop replaces the token, so a pending restart
//! of an earlier incarnation can never fire. Of itself: the kind `supervisor`, failing to
//! its parent only when a child's policy says `escalate`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ractor::concurrency::JoinHandle;

use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RactorErr, RpcReplyPort, SpawnErr,
    SupervisionEvent,
};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info, warn};

use super::backoff::{Backoff, Jitter};
use super::child::{ChildContext, ChildSpec, Probe};
use super::exit::{ExitHandle, ExitRequest};
use super::metrics as m;
use super::policy::{
    Action, Decision, Exit, Failure, FailureClass, History, Policy, Restart, decide,
};
use super::snapshot::NodeState;
use super::view::{ChildView, FailureView, Inner, SupervisorView, rfc3339};

/// A pending timer message.
type Timer = JoinHandle<Result<(), ractor::MessagingErr<SupervisorMsg>>>;

/// How long to wait for a killed child to be gone.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// A running child's liveness is looked at least this often, so that a timeout changed
/// through its policy cell (a config reload) applies within it.
const LIVENESS_RECHECK: Duration = Duration::from_secs(60);

/// The kind of every supervisor, for policies and metrics.
pub const KIND: &str = "supervisor";

/// A supervisor's built-in policy: 100 ms → 10 s, and 30 s to stop, which must cover the
/// graceful stop of everything below it; otherwise [`Policy::DEFAULT`].
pub const DEFAULT_POLICY: Policy = Policy {
    backoff: Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(10),
        ..Policy::DEFAULT.backoff
    },
    shutdown_timeout: Duration::from_secs(30),
    ..Policy::DEFAULT
};

/// Which children restart together when one fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Only the failed child.
    OneForOne,
    /// Every child (except temporary ones) restarts with it.
    OneForAll,
    /// The failed child and those started after it.
    RestForOne,
}

impl Strategy {
    /// The snake-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::OneForOne => "one_for_one",
            Strategy::OneForAll => "one_for_all",
            Strategy::RestForOne => "rest_for_one",
        }
    }
}

/// An operator action on one child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlAction {
    /// Stop gracefully and start again at once; not counted as a failure.
    Restart,
    /// Stop gracefully; it stays stopped until started.
    Stop,
    /// Start a parked, stopped or backing-off child now, with a fresh restart budget.
    Start,
    /// Kill abruptly; treated as a transient failure (how a crash is simulated).
    Kill,
}

impl ControlAction {
    /// The lower-case verb, as in the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Restart => "restart",
            Self::Stop => "stop",
            Self::Start => "start",
            Self::Kill => "kill",
        }
    }
}

impl FromStr for ControlAction {
    type Err = SupervisorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "restart" => Ok(Self::Restart),
            "stop" => Ok(Self::Stop),
            "start" => Ok(Self::Start),
            "kill" => Ok(Self::Kill),
            other => Err(SupervisorError::BadAction(other.to_string())),
        }
    }
}

/// Why a request to a supervisor was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SupervisorError {
    /// No child at that path or id.
    #[error("no actor at {0}")]
    UnknownChild(String),
    /// Not one of restart, stop, start, kill.
    #[error("unknown action {0:?}: expected restart, stop, start or kill")]
    BadAction(String),
    /// The action does not fit the child's state.
    #[error("{path}: {reason}")]
    Conflict {
        /// The child.
        path: String,
        /// Why not.
        reason: String,
    },
    /// The child could not be started.
    #[error("{path} failed to start: {reason}")]
    StartFailed {
        /// The child.
        path: String,
        /// Why.
        reason: String,
    },
    /// The supervisor is stopping or gone.
    #[error("the supervisor is shutting down")]
    ShuttingDown,
    /// The supervisor did not answer in time (it may be stuck stopping a child).
    #[error("the supervisor did not answer within {0} s")]
    Timeout(u64),
}

/// Messages of [`Supervisor`].
pub enum SupervisorMsg {
    /// A child's backoff delay is over.
    RestartDue {
        /// The child.
        order: u64,
        /// Must match the child's current timer token.
        token: u64,
    },
    /// Time to check a child's heartbeat.
    LivenessDue {
        /// The child.
        order: u64,
        /// Must match the child's current generation.
        generation: u64,
    },
    /// A start failed before the actor ran.
    StartFailed {
        /// The child.
        order: u64,
        /// The incarnation that failed.
        generation: u64,
        /// The classified failure.
        failure: Failure,
    },
    /// Add a dynamic child and start it; replies with its cell.
    Add {
        /// The new child.
        spec: ChildSpec,
        /// The started child, or why not.
        reply: RpcReplyPort<Result<ActorCell, SupervisorError>>,
    },
    /// Stop a child gracefully and forget it.
    Remove {
        /// The child's id.
        id: String,
        /// Done, or why not.
        reply: RpcReplyPort<Result<(), SupervisorError>>,
    },
    /// An operator action on a child.
    Control {
        /// The child's id.
        id: String,
        /// What to do.
        action: ControlAction,
        /// Done, or why not.
        reply: RpcReplyPort<Result<(), SupervisorError>>,
    },
}

impl fmt::Debug for SupervisorMsg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RestartDue { order, token } => write!(f, "RestartDue({order}, {token})"),
            Self::LivenessDue { order, generation } => {
                write!(f, "LivenessDue({order}, {generation})")
            }
            Self::StartFailed { order, failure, .. } => {
                write!(f, "StartFailed({order}, {failure})")
            }
            Self::Add { spec, .. } => write!(f, "Add({})", spec.id),
            Self::Remove { id, .. } => write!(f, "Remove({id})"),
            Self::Control { id, action, .. } => write!(f, "Control({id}, {action:?})"),
        }
    }
}

/// Starts a supervisor.
pub struct SupervisorArgs {
    /// Its own path.
    pub path: String,
    /// How failures spread to siblings.
    pub strategy: Strategy,
    /// The children, in start order.
    pub children: Vec<ChildSpec>,
    /// Where children whose policy says `exit` ask for it.
    pub exit: ExitHandle,
    /// The tree's randomness.
    pub jitter: Jitter,
    /// Where it publishes its children.
    pub(crate) inner: Arc<watch::Sender<Inner>>,
}

/// The supervisor actor. Holds no configuration; everything is in [`SupervisorArgs`].
pub struct Supervisor;

/// What a supervisor knows while it runs.
pub struct SupervisorState {
    path: String,
    /// `actor` span with `actor.kind = supervisor` and `actor.path`; wraps every handler.
    span: tracing::Span,
    strategy: Strategy,
    exit: ExitHandle,
    jitter: Jitter,
    inner: Arc<watch::Sender<Inner>>,
    /// Children by start order (dynamic children get later orders).
    children: BTreeMap<u64, Child>,
    by_id: HashMap<String, u64>,
    /// Live incarnations only: an event from a cell not in here is stale.
    by_actor: HashMap<ActorId, u64>,
    next_order: u64,
    shutting_down: bool,
}

/// One child's record across its incarnations.
struct Child {
    spec: ChildSpec,
    path: String,
    state: NodeState,
    generation: u64,
    cell: Option<ActorCell>,
    history: History,
    /// When the current incarnation started, and that time as RFC 3339 (formatted once).
    started: Option<(Instant, Arc<str>)>,
    /// The id, path and kind as shared strings for the published view.
    names: (Arc<str>, Arc<str>, Arc<str>),
    last_failure: Option<FailureView>,
    next_restart_at: Option<Instant>,
    /// Set while it waits to restart together with the child of that order.
    group_leader: Option<u64>,
    /// Identifies the pending restart timer; replaced whenever that timer is cancelled.
    timer_token: u64,
    restart_timer: Option<Timer>,
    liveness_timer: Option<Timer>,
    probe: Probe,
    inner_tx: Arc<watch::Sender<Inner>>,
    inner_rx: watch::Receiver<Inner>,
}

impl Child {
    fn new(spec: ChildSpec, parent: &str) -> Self {
        let (tx, rx) = watch::channel(Inner::Leaf);
        let path = format!("{parent}/{}", spec.id);
        let names = (
            Arc::from(spec.id.as_str()),
            Arc::from(path.as_str()),
            Arc::from(spec.kind.as_str()),
        );
        let child = Self {
            names,
            path,
            spec,
            state: NodeState::Stopped,
            generation: 0,
            cell: None,
            history: History::default(),
            started: None,
            last_failure: None,
            next_restart_at: None,
            group_leader: None,
            timer_token: 0,
            restart_timer: None,
            liveness_timer: None,
            probe: Probe::new(Instant::now()),
            inner_tx: Arc::new(tx),
            inner_rx: rx,
        };
        state_gauge(&child.spec.kind, child.state, 1.0);
        child
    }

    fn set_state(&mut self, state: NodeState) {
        if self.state != state {
            state_gauge(&self.spec.kind, self.state, -1.0);
            state_gauge(&self.spec.kind, state, 1.0);
            self.state = state;
        }
    }

    fn cancel_restart(&mut self) {
        if let Some(timer) = self.restart_timer.take() {
            timer.abort();
        }
        self.timer_token += 1;
        self.next_restart_at = None;
        self.group_leader = None;
    }

    fn cancel_liveness(&mut self) {
        if let Some(timer) = self.liveness_timer.take() {
            timer.abort();
        }
    }

    /// Records the end of the current incarnation at `now`: no cell, no liveness check,
    /// and `failure`, if it was one, as the last failure. Returns how long it ran.
    fn record_exit(&mut self, now: Instant, failure: Option<&Failure>) -> Duration {
        self.cell = None;
        self.cancel_liveness();
        let ran_for = self
            .started
            .as_ref()
            .map(|(t, _)| now.saturating_duration_since(*t))
            .unwrap_or_default();
        self.started = None;
        if let Some(f) = failure {
            self.last_failure = Some(FailureView {
                class: f.class,
                reason: f.reason.clone(),
                at: SystemTime::now(),
            });
        }
        ran_for
    }

    /// The streak warning, while the failures in a row are at least `warn_after`.
    fn warning(&self) -> Option<String> {
        let warn_after = self.spec.policy().warn_after;
        let failures = self.history.consecutive;
        if warn_after == 0 || failures < warn_after {
            return None;
        }
        let reason = self.last_failure.as_ref().map_or("", |f| f.reason.as_str());
        Some(self.spec.streak_warning(&self.names.1, failures, reason))
    }

    fn view(&self) -> Arc<ChildView> {
        Arc::new(ChildView {
            id: self.names.0.clone(),
            path: self.names.1.clone(),
            kind: self.names.2.clone(),
            restart: self.spec.restart,
            readiness: self.spec.readiness,
            state: self.state,
            generation: self.generation,
            restarts_total: self.history.restarts_total,
            window: self.spec.policy().window,
            failures: self.history.failure_times(),
            consecutive: self.history.consecutive,
            warning: self.warning(),
            last_failure: self.last_failure.clone(),
            next_restart_at: self.next_restart_at,
            started: self.started.clone(),
            probe: self.probe.clone(),
            inner: self.inner_rx.clone(),
        })
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        state_gauge(&self.spec.kind, self.state, -1.0);
        self.cancel_restart();
        self.cancel_liveness();
    }
}

/// What an exit is logged as: its failure, or "stopped".
fn cause_of(failure: Option<&Failure>) -> String {
    failure
        .map(|f| f.to_string())
        .unwrap_or_else(|| "stopped".to_string())
}

fn state_gauge(kind: &str, state: NodeState, delta: f64) {
    metrics::gauge!(m::CHILDREN, "kind" => kind.to_string(), "state" => state.as_str())
        .increment(delta);
}

impl ChildSpec {
    /// A child that is itself a supervisor of `children`, with [`DEFAULT_POLICY`] (replace
    /// it with [`ChildSpec::with_policy`]).
    pub fn supervisor(id: impl Into<String>, strategy: Strategy, children: Vec<ChildSpec>) -> Self {
        ChildSpec::supervisor_of(id, strategy, ChildSet::new(children))
    }

    /// A supervisor whose children are those of `set` as it is at each of its starts: a
    /// child added to (or removed from) the set while it runs is also added to (removed
    /// from) the running supervisor through [`SupervisorRef`](super::SupervisorRef), and a
    /// restart of this supervisor then starts the set as changed, not as it was built.
    pub fn supervisor_of(id: impl Into<String>, strategy: Strategy, set: ChildSet) -> Self {
        ChildSpec::new(id, KIND, Restart::Permanent, move |ctx: ChildContext| {
            let children = set.specs();
            async move {
                let args = SupervisorArgs {
                    path: ctx.path.clone(),
                    strategy,
                    children,
                    exit: ctx.exit.clone(),
                    jitter: ctx.jitter.clone(),
                    inner: ctx.inner.clone(),
                };
                let (actor, _) =
                    Actor::spawn_linked(None, Supervisor, args, ctx.supervisor.clone()).await?;
                Ok(actor.get_cell())
            }
        })
        .with_policy(DEFAULT_POLICY)
    }
}

/// The children a supervisor starts with, shared with whoever changes them while the tree
/// runs (a config reload adding or removing an account). Cheap to clone; clones share.
#[derive(Clone, Default)]
pub struct ChildSet(Arc<std::sync::RwLock<Vec<ChildSpec>>>);

impl ChildSet {
    /// A set of `children`, in start order.
    pub fn new(children: Vec<ChildSpec>) -> Self {
        Self(Arc::new(std::sync::RwLock::new(children)))
    }

    /// The specs now, in start order.
    pub fn specs(&self) -> Vec<ChildSpec> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether a child `id` is in the set.
    pub fn contains(&self, id: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|spec| spec.id == id)
    }

    /// Puts `spec` in the set: in place of the child with its id, else last.
    pub fn put(&self, spec: ChildSpec) {
        let mut specs = self.0.write().unwrap_or_else(|e| e.into_inner());
        match specs.iter_mut().find(|s| s.id == spec.id) {
            Some(slot) => *slot = spec,
            None => specs.push(spec),
        }
    }

    /// Takes child `id` out of the set; returns whether it was there.
    pub fn remove(&self, id: &str) -> bool {
        let mut specs = self.0.write().unwrap_or_else(|e| e.into_inner());
        let before = specs.len();
        specs.retain(|s| s.id != id);
        specs.len() != before
    }
}

impl fmt::Debug for ChildSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let specs = self.0.read().unwrap_or_else(|e| e.into_inner());
        f.debug_list().entries(specs.iter().map(|s| &s.id)).finish()
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let span = tracing::info_span!("actor", actor.kind = KIND, actor.path = %args.path);
        let mut state = SupervisorState {
            span,
            path: args.path,
            strategy: args.strategy,
            exit: args.exit,
            jitter: args.jitter,
            inner: args.inner,
            children: BTreeMap::new(),
            by_id: HashMap::new(),
            by_actor: HashMap::new(),
            next_order: 0,
            shutting_down: false,
        };
        state.inner.send_replace(Inner::Supervisor(SupervisorView {
            control: myself.clone(),
            strategy: state.strategy,
            children: BTreeMap::new(),
        }));
        for spec in args.children {
            if state.by_id.contains_key(&spec.id) {
                return Err(format!("{}: two children named {:?}", state.path, spec.id).into());
            }
            state.insert(spec);
        }
        // Children start here, in order, so that once a supervisor is spawned its whole
        // subtree has been spawned and published. A start failure is handled through
        // `StartFailed`, after this returns.
        let orders: Vec<u64> = state.children.keys().copied().collect();
        for order in orders {
            let _ = state.start_child(&myself, order).await;
        }
        Ok(state)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.stop_all().await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let span = state.span.clone();
        async move {
            match msg {
                SupervisorMsg::RestartDue { order, token } => {
                    state.restart_due(&myself, order, token).await
                }
                SupervisorMsg::LivenessDue { order, generation } => {
                    state.liveness_due(&myself, order, generation).await
                }
                SupervisorMsg::StartFailed {
                    order,
                    generation,
                    failure,
                } => {
                    let current = state.children.get(&order).is_some_and(|c| {
                        c.generation == generation
                            && c.cell.is_none()
                            && c.state == NodeState::Starting
                    });
                    if current {
                        state.on_exit(&myself, order, Exit::Failed(failure)).await
                    } else {
                        Ok(())
                    }
                }
                SupervisorMsg::Add { spec, reply } => {
                    let result = state.add(&myself, spec).await;
                    let _ = reply.send(result);
                    Ok(())
                }
                SupervisorMsg::Remove { id, reply } => {
                    let result = state.remove(&id).await;
                    let _ = reply.send(result);
                    Ok(())
                }
                SupervisorMsg::Control { id, action, reply } => {
                    state.control(&myself, &id, action, reply).await
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let span = state.span.clone();
        async move {
            match event {
                SupervisionEvent::ActorStarted(cell) => {
                    if let Some(&order) = state.by_actor.get(&cell.get_id()) {
                        if let Some(child) = state.children.get_mut(&order) {
                            child.set_state(NodeState::Running);
                            debug!(actor = %child.path, generation = child.generation, "Running.");
                        }
                        state.publish(order);
                    }
                    Ok(())
                }
                SupervisionEvent::ActorFailed(cell, err) => match state.by_actor.remove(&cell.get_id())
                {
                    Some(order) => {
                        state
                            .on_exit(&myself, order, Exit::Failed(Failure::classify(&err)))
                            .await
                    }
                    None => {
                        debug!(supervisor = %state.path, error = %err, "Ignoring the failure of a stale incarnation.");
                        Ok(())
                    }
                },
                SupervisionEvent::ActorTerminated(cell, _, reason) => {
                    match state.by_actor.remove(&cell.get_id()) {
                        Some(order) => {
                            let exit = match reason.as_deref() {
                                Some("killed") => Exit::Failed(Failure::transient("killed")),
                                _ => Exit::Normal(reason),
                            };
                            state.on_exit(&myself, order, exit).await
                        }
                        None => Ok(()),
                    }
                }
                _ => Ok(()),
            }
        }
        .instrument(span)
        .await
    }
}

impl SupervisorState {
    fn insert(&mut self, spec: ChildSpec) -> u64 {
        let order = self.next_order;
        self.next_order += 1;
        self.by_id.insert(spec.id.clone(), order);
        self.children.insert(order, Child::new(spec, &self.path));
        self.publish(order);
        order
    }

    fn publish(&self, order: u64) {
        let view = self.children.get(&order).map(Child::view);
        self.inner.send_modify(|inner| {
            if let Inner::Supervisor(s) = inner {
                match view {
                    Some(view) => {
                        s.children.insert(order, view);
                    }
                    None => {
                        s.children.remove(&order);
                    }
                }
            }
        });
    }

    /// Starts a new incarnation of child `order`. A failed start is reported to the
    /// supervisor's own mailbox, so its consequences are decided in order like any exit.
    async fn start_child(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        order: u64,
    ) -> Result<ActorCell, SupervisorError> {
        let Some(child) = self.children.get_mut(&order) else {
            return Err(SupervisorError::UnknownChild(format!(
                "{}/#{order}",
                self.path
            )));
        };
        let now = Instant::now();
        child.generation += 1;
        child.cancel_restart();
        child.probe = Probe::new(now);
        child.started = Some((now, rfc3339(SystemTime::now()).into()));
        child.set_state(NodeState::Starting);
        let ctx = ChildContext {
            supervisor: myself.get_cell(),
            path: child.path.clone(),
            kind: child.spec.kind.clone(),
            generation: child.generation,
            probe: child.probe.clone(),
            exit: self.exit.clone(),
            jitter: self.jitter.clone(),
            inner: child.inner_tx.clone(),
        };
        let start = child.spec.start.clone();
        let generation = child.generation;
        let path = child.path.clone();
        let liveness = child.spec.policy().liveness_timeout;
        self.publish(order);
        // Checked at least every LIVENESS_RECHECK, with or without a timeout: a timeout
        // changed (or set) through the policy cell applies within that.
        let first_check = liveness.map_or(LIVENESS_RECHECK, |t| t.min(LIVENESS_RECHECK));

        match start(ctx).await {
            Ok(cell) => {
                self.by_actor.insert(cell.get_id(), order);
                if let Some(child) = self.children.get_mut(&order) {
                    child.cell = Some(cell.clone());
                    child.liveness_timer =
                        Some(
                            myself.send_after(first_check, move || SupervisorMsg::LivenessDue {
                                order,
                                generation,
                            }),
                        );
                }
                Ok(cell)
            }
            Err(err) => {
                let failure = match err {
                    SpawnErr::StartupFailed(err) => Failure::classify(&err),
                    other => Failure::transient(other.to_string()),
                };
                let reason = failure.to_string();
                let _ = myself.send_message(SupervisorMsg::StartFailed {
                    order,
                    generation,
                    failure,
                });
                Err(SupervisorError::StartFailed { path, reason })
            }
        }
    }

    /// Takes the live cell out of the record, so its exit event is ignored as stale.
    fn detach(&mut self, order: u64) -> Option<ActorCell> {
        let child = self.children.get_mut(&order)?;
        child.cancel_liveness();
        let cell = child.cell.take()?;
        self.by_actor.remove(&cell.get_id());
        Some(cell)
    }

    /// Stops child `order` gracefully within its shutdown timeout, else kills it.
    async fn stop_child(&mut self, order: u64, reason: &str) {
        let Some(cell) = self.detach(order) else {
            return;
        };
        let Some(child) = self.children.get_mut(&order) else {
            return;
        };
        child.set_state(NodeState::Stopping);
        let (path, timeout) = (child.path.clone(), child.spec.policy().shutdown_timeout);
        self.publish(order);
        stop_cell(&path, &cell, timeout, reason).await;
        if let Some(child) = self.children.get_mut(&order) {
            child.set_state(NodeState::Stopped);
            child.started = None;
        }
        self.publish(order);
    }

    /// Stops every child in reverse start order (shutdown, escalation).
    ///
    /// Temporary children (one per connection) are independent of each other and of their
    /// siblings' order, so they stop together first: a thousand slow clients then cost one
    /// shutdown timeout, not a thousand.
    async fn stop_all(&mut self) {
        self.shutting_down = true;
        let temporary: Vec<u64> = self
            .children
            .iter()
            .filter(|(_, c)| c.spec.restart == Restart::Temporary && c.cell.is_some())
            .map(|(o, _)| *o)
            .collect();
        let mut stopping = Vec::with_capacity(temporary.len());
        for order in temporary {
            if let Some(cell) = self.detach(order)
                && let Some(child) = self.children.get_mut(&order)
            {
                child.set_state(NodeState::Stopping);
                stopping.push((
                    order,
                    child.path.clone(),
                    child.spec.policy().shutdown_timeout,
                    cell,
                ));
                self.publish(order);
            }
        }
        futures_util::future::join_all(
            stopping
                .iter()
                .map(|(_, path, timeout, cell)| stop_cell(path, cell, *timeout, "shutdown")),
        )
        .await;
        for (order, ..) in stopping {
            if let Some(child) = self.children.get_mut(&order) {
                child.set_state(NodeState::Stopped);
                child.started = None;
            }
            self.publish(order);
        }
        let orders: Vec<u64> = self.children.keys().rev().copied().collect();
        for order in orders {
            if let Some(child) = self.children.get_mut(&order) {
                child.cancel_restart();
                if child.cell.is_none() && child.state != NodeState::Parked {
                    child.set_state(NodeState::Stopped);
                }
            }
            self.stop_child(order, "shutdown").await;
        }
    }

    /// The one path every exit of a child takes: the exit is recorded, [`decide`] chooses,
    /// and the decision is carried out.
    async fn on_exit(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        order: u64,
        exit: Exit,
    ) -> Result<(), ActorProcessingErr> {
        if self.shutting_down {
            return Ok(());
        }
        let unit = self.jitter.unit();
        let now = Instant::now();
        let Some(child) = self.children.get_mut(&order) else {
            return Ok(());
        };
        let failure = exit.effective_failure(child.spec.restart);
        let ran_for = child.record_exit(now, failure.as_ref());
        let decision = decide(
            &exit,
            child.spec.restart,
            &child.spec.policy(),
            &mut child.history,
            ran_for,
            now,
            unit,
        );
        match decision {
            Decision::Restart { delay, attempt } => {
                let at = now + delay;
                self.schedule_restart(myself, order, failure.as_ref(), attempt, delay, at)
                    .await;
                Ok(())
            }
            Decision::Stop => {
                self.retire(order, failure.as_ref());
                Ok(())
            }
            Decision::GiveUp {
                action,
                exit_code,
                reason,
            } => {
                self.give_up(order, failure.as_ref(), action, exit_code, reason)
                    .await
            }
        }
    }

    /// Restart `order` after `delay` (at `at`): counted and logged, the child backing off
    /// and its group stopped; started at once when there is neither delay nor group, else
    /// by a timer.
    async fn schedule_restart(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        order: u64,
        failure: Option<&Failure>,
        attempt: u32,
        delay: Duration,
        at: Instant,
    ) {
        let Some(child) = self.children.get_mut(&order) else {
            return;
        };
        let path = &child.path;
        let kind = child.spec.kind.clone();
        let cause = cause_of(failure);
        let class = failure.map_or(FailureClass::Transient, |f| f.class);
        metrics::counter!(m::RESTARTS_TOTAL, "kind" => kind.clone(), "class" => class.as_str())
            .increment(1);
        metrics::histogram!(m::BACKOFF_DELAY_SECONDS, "kind" => kind).record(delay.as_secs_f64());
        let delay_ms = delay.as_millis() as u64;
        warn!(actor = %path, attempt, delay_ms, error = %cause, "Restarting after failure.");
        let warn_after = child.spec.policy().warn_after;
        if warn_after > 0 && attempt == warn_after {
            let reason = failure.map_or("stopped", |f| f.reason.as_str());
            let warning = child.spec.streak_warning(path, attempt, reason);
            warn!(actor = %path, failures = attempt, error = %cause, "{warning}");
        }
        child.set_state(NodeState::BackingOff);
        child.next_restart_at = Some(at);
        self.publish(order);
        self.stop_group(order, at).await;
        if delay.is_zero() && !self.has_group(order) {
            let _ = self.start_child(myself, order).await;
        } else if let Some(child) = self.children.get_mut(&order) {
            let token = child.timer_token;
            child.restart_timer =
                Some(myself.send_after(delay, move || SupervisorMsg::RestartDue { order, token }));
        }
    }

    /// No restart: a temporary child is removed, any other stays stopped.
    fn retire(&mut self, order: u64, failure: Option<&Failure>) {
        let Some(child) = self.children.get_mut(&order) else {
            return;
        };
        if child.spec.restart == Restart::Temporary {
            let cause = cause_of(failure);
            debug!(actor = %child.path, reason = %cause, "Temporary child exited; removing it.");
            self.by_id.remove(&child.spec.id);
            self.children.remove(&order);
        } else {
            info!(actor = %child.path, "Stopped.");
            child.set_state(NodeState::Stopped);
        }
        self.publish(order);
    }

    /// The child is parked; then, by its policy's `action`, it stays so, the program is
    /// asked to exit with `exit_code`, or this supervisor stops its children and fails to
    /// its parent (fatal if the child's failure was).
    async fn give_up(
        &mut self,
        order: u64,
        failure: Option<&Failure>,
        action: Action,
        exit_code: i32,
        reason: String,
    ) -> Result<(), ActorProcessingErr> {
        let Some(child) = self.children.get_mut(&order) else {
            return Ok(());
        };
        let kind = child.spec.kind.clone();
        metrics::counter!(m::GIVE_UPS_TOTAL, "kind" => kind, "action" => action.as_str())
            .increment(1);
        child.set_state(NodeState::Parked);
        let path = child.path.clone();
        self.publish(order);
        match action {
            Action::Park => {
                error!(actor = %path, reason = %reason, "Parked: it stays down until an operator starts it.");
                Ok(())
            }
            Action::Exit => {
                error!(actor = %path, reason = %reason, code = exit_code, "Giving up; the process will exit.");
                self.exit.request(ExitRequest {
                    code: exit_code,
                    path,
                    reason,
                });
                Ok(())
            }
            Action::Escalate => {
                error!(actor = %path, reason = %reason, "Giving up; escalating to the parent supervisor.");
                self.stop_all().await;
                let reason = format!("{path} gave up: {reason}");
                let fatal = failure.is_some_and(|f| f.class == FailureClass::Fatal);
                let failure = if fatal {
                    Failure::fatal(reason)
                } else {
                    Failure::transient(reason)
                };
                Err(Box::new(failure))
            }
        }
    }

    /// Orders of the siblings that restart together with `order` under the strategy.
    fn group_of(&self, order: u64) -> Vec<u64> {
        let in_group = |o: &u64, c: &Child| {
            *o != order
                && c.spec.restart != Restart::Temporary
                && matches!(
                    c.state,
                    NodeState::Starting | NodeState::Running | NodeState::BackingOff
                )
        };
        match self.strategy {
            Strategy::OneForOne => Vec::new(),
            Strategy::OneForAll => self
                .children
                .iter()
                .filter(|(o, c)| in_group(o, c))
                .map(|(o, _)| *o)
                .collect(),
            Strategy::RestForOne => self
                .children
                .range(order + 1..)
                .filter(|(o, c)| in_group(o, c))
                .map(|(o, _)| *o)
                .collect(),
        }
    }

    fn has_group(&self, leader: u64) -> bool {
        self.children
            .values()
            .any(|c| c.group_leader == Some(leader))
    }

    /// Stops the siblings that restart with `leader`, in reverse start order, and marks them
    /// to start again with it at `at`.
    async fn stop_group(&mut self, leader: u64, at: Instant) {
        let group = self.group_of(leader);
        for &order in group.iter().rev() {
            self.stop_child(order, "sibling restart").await;
            if let Some(child) = self.children.get_mut(&order) {
                child.cancel_restart();
                child.history.restarts_total += 1;
                child.group_leader = Some(leader);
                child.next_restart_at = Some(at);
                child.set_state(NodeState::BackingOff);
                info!(actor = %child.path, strategy = self.strategy.as_str(), "Restarting with a failed sibling.");
            }
            self.publish(order);
        }
    }

    async fn restart_due(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        order: u64,
        token: u64,
    ) -> Result<(), ActorProcessingErr> {
        let due = self
            .children
            .get(&order)
            .is_some_and(|c| c.timer_token == token && c.state == NodeState::BackingOff);
        if !due || self.shutting_down {
            return Ok(());
        }
        let mut members: Vec<u64> = self
            .children
            .iter()
            .filter(|(_, c)| c.group_leader == Some(order) && c.state == NodeState::BackingOff)
            .map(|(o, _)| *o)
            .collect();
        members.push(order);
        members.sort_unstable();
        for member in members {
            let _ = self.start_child(myself, member).await;
        }
        Ok(())
    }

    async fn liveness_due(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        order: u64,
        generation: u64,
    ) -> Result<(), ActorProcessingErr> {
        let Some(child) = self.children.get_mut(&order) else {
            return Ok(());
        };
        if child.generation != generation || child.cell.is_none() {
            return Ok(());
        }
        let Some(timeout) = child.spec.policy().liveness_timeout else {
            // No timeout now; one may be set later.
            child.liveness_timer =
                Some(
                    myself.send_after(LIVENESS_RECHECK, move || SupervisorMsg::LivenessDue {
                        order,
                        generation,
                    }),
                );
            return Ok(());
        };
        let now = Instant::now();
        let last = child.probe.last_beat();
        let silent = now.saturating_duration_since(last);
        if silent < timeout {
            let next = (timeout - silent).min(LIVENESS_RECHECK);
            child.liveness_timer = Some(myself.send_after(next, move || {
                SupervisorMsg::LivenessDue { order, generation }
            }));
            return Ok(());
        }
        let path = child.path.clone();
        let silent_ms = silent.as_millis() as u64;
        warn!(actor = %path, silent_ms, "No heartbeat within the liveness timeout; killing it as hung.");
        if let Some(cell) = self.detach(order) {
            let _ = cell.kill_and_wait(Some(KILL_WAIT)).await;
        }
        let failure = Failure {
            class: FailureClass::Hung,
            reason: format!("no heartbeat for {silent_ms} ms"),
            retry_after: None,
            retry_within: None,
        };
        self.on_exit(myself, order, Exit::Failed(failure)).await
    }

    async fn add(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        spec: ChildSpec,
    ) -> Result<ActorCell, SupervisorError> {
        if self.shutting_down {
            return Err(SupervisorError::ShuttingDown);
        }
        if self.by_id.contains_key(&spec.id) {
            return Err(SupervisorError::Conflict {
                path: format!("{}/{}", self.path, spec.id),
                reason: "a child with this id exists".to_string(),
            });
        }
        let order = self.insert(spec);
        self.start_child(myself, order).await
    }

    async fn remove(&mut self, id: &str) -> Result<(), SupervisorError> {
        let order = *self
            .by_id
            .get(id)
            .ok_or_else(|| SupervisorError::UnknownChild(format!("{}/{id}", self.path)))?;
        self.stop_child(order, "removed").await;
        self.by_id.remove(id);
        self.children.remove(&order);
        self.publish(order);
        Ok(())
    }

    async fn control(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        id: &str,
        action: ControlAction,
        reply: RpcReplyPort<Result<(), SupervisorError>>,
    ) -> Result<(), ActorProcessingErr> {
        let Some(&order) = self.by_id.get(id) else {
            let _ = reply.send(Err(SupervisorError::UnknownChild(format!(
                "{}/{id}",
                self.path
            ))));
            return Ok(());
        };
        if self.shutting_down {
            let _ = reply.send(Err(SupervisorError::ShuttingDown));
            return Ok(());
        }
        let (path, running) = match self.children.get(&order) {
            Some(c) => (c.path.clone(), c.cell.is_some()),
            None => return Ok(()),
        };
        let conflict = |reason: &str| {
            Err(SupervisorError::Conflict {
                path: path.clone(),
                reason: reason.to_string(),
            })
        };
        info!(actor = %path, action = ?action, "Operator action.");
        match action {
            ControlAction::Stop => {
                if let Some(c) = self.children.get_mut(&order) {
                    c.cancel_restart();
                }
                self.stop_child(order, "stopped by operator").await;
                if let Some(c) = self.children.get_mut(&order) {
                    c.set_state(NodeState::Stopped);
                }
                self.publish(order);
                let _ = reply.send(Ok(()));
                Ok(())
            }
            ControlAction::Start => {
                if running {
                    let _ = reply.send(conflict("already running; use restart"));
                    return Ok(());
                }
                if let Some(c) = self.children.get_mut(&order) {
                    c.history.reset_budget();
                }
                let result = self.start_child(myself, order).await.map(|_| ());
                let _ = reply.send(result);
                Ok(())
            }
            ControlAction::Restart => {
                self.stop_child(order, "restarted by operator").await;
                let result = self.start_child(myself, order).await.map(|_| ());
                let _ = reply.send(result);
                Ok(())
            }
            ControlAction::Kill => {
                let Some(cell) = self.detach(order) else {
                    let _ = reply.send(conflict("not running"));
                    return Ok(());
                };
                let _ = cell.kill_and_wait(Some(KILL_WAIT)).await;
                let _ = reply.send(Ok(()));
                self.on_exit(
                    myself,
                    order,
                    Exit::Failed(Failure::transient("killed by operator")),
                )
                .await
            }
        }
    }
}

/// Stops `cell` gracefully within `timeout`, then kills it.
async fn stop_cell(path: &str, cell: &ActorCell, timeout: Duration, reason: &str) {
    match cell
        .stop_and_wait(Some(reason.to_string()), Some(timeout))
        .await
    {
        Ok(()) => debug!(actor = %path, reason, "Stopped gracefully."),
        Err(RactorErr::Timeout) => {
            let timeout_ms = timeout.as_millis() as u64;
            warn!(actor = %path, timeout_ms, "Did not stop within its shutdown timeout; killing it.");
            let _ = cell.kill_and_wait(Some(KILL_WAIT)).await;
        }
        // Already gone.
        Err(_) => {}
    }
}
