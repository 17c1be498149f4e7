//! Child specs, and the context a child is started with.
//!
//! A [`ChildSpec`] says how to start one child and how to treat its exits. Its start
//! function receives a [`ChildContext`] and must spawn the actor linked to
//! `ctx.supervisor` (`ractor::Actor::spawn_linked`), returning its cell. The function is
//! called again for every restart, so it builds fresh arguments each time.
//!
//! `pre_start` of a supervised actor runs inside its supervisor's handler: keep it short
//! and do slow work (network, start slots) in `post_start` or a message. The child counts
//! as `running` once its `post_start` finished.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use ractor::{ActorCell, SpawnErr};
use tokio::sync::watch;
use tokio::time::Instant;

use super::backoff::Jitter;
use super::exit::ExitHandle;
use super::policy::{Policy, Restart};
use super::view::Inner;

/// The future a start function returns.
pub type StartFuture = Pin<Box<dyn Future<Output = Result<ActorCell, SpawnErr>> + Send>>;

/// Starts one incarnation of a child.
pub type StartFn = Arc<dyn Fn(ChildContext) -> StartFuture + Send + Sync>;

/// When a running child counts as ready (for `/readyz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// As soon as it runs.
    OnStart,
    /// Only once it calls [`Probe::set_ready`] (e.g. after a first successful sync).
    Reported,
}

/// How to start and supervise one child.
#[derive(Clone)]
pub struct ChildSpec {
    /// The child's name among its siblings: the last segment of its path.
    pub id: String,
    /// What sort of thing it is (`matrix_account`, `supervisor`, …): metrics label and
    /// config key of its default policy.
    pub kind: String,
    /// When it is brought back.
    pub restart: Restart,
    /// Backoff, budget, give-up actions, liveness and shutdown timeouts; read at each
    /// decision, so a change made through the cell applies to the next one.
    policy: PolicyCell,
    /// When it counts as ready.
    pub readiness: Readiness,
    /// How operators know it in warnings ("approval handler for nova"); default its path.
    pub label: Option<String>,
    /// Called for each incarnation.
    pub(crate) start: StartFn,
}

impl ChildSpec {
    /// A spec with the default policy and readiness on start.
    pub fn new<F, Fut>(
        id: impl Into<String>,
        kind: impl Into<String>,
        restart: Restart,
        start: F,
    ) -> Self
    where
        F: Fn(ChildContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<ActorCell, SpawnErr>> + Send + 'static,
    {
        Self {
            id: id.into(),
            kind: kind.into(),
            restart,
            policy: PolicyCell::new(Policy::default()),
            readiness: Readiness::OnStart,
            label: None,
            start: Arc::new(move |ctx| Box::pin(start(ctx))),
        }
    }

    /// Replaces the policy with a fixed one.
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = PolicyCell::new(policy);
        self
    }

    /// Takes its policy from `cell`: a change made through the cell (a config reload)
    /// applies to this child's next backoff, budget, liveness and stop decisions, in every
    /// incarnation, without a restart.
    pub fn with_policy_cell(mut self, cell: PolicyCell) -> Self {
        self.policy = cell;
        self
    }

    /// The policy now.
    pub fn policy(&self) -> Policy {
        self.policy.get()
    }

    /// Names the child in warnings ("approval handler for nova failed 5 times in a row: …")
    /// instead of its path.
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// The warning of a child that failed `failures` times in a row, the last time because
    /// of `reason`: `<label or path> failed <n> times in a row: <reason>`.
    pub(crate) fn streak_warning(&self, path: &str, failures: u32, reason: &str) -> String {
        let who = self.label.as_deref().unwrap_or(path);
        format!("{who} failed {failures} times in a row: {reason}")
    }

    /// The child reports readiness itself through [`Probe::set_ready`].
    pub fn reports_readiness(mut self) -> Self {
        self.readiness = Readiness::Reported;
        self
    }
}

impl fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildSpec")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("restart", &self.restart)
            .field("policy", &self.policy.get())
            .finish_non_exhaustive()
    }
}

/// A policy shared between the child specs that use it and whoever may change it while the
/// tree runs. Cheap to clone (clones share the value) and to read.
#[derive(Clone)]
pub struct PolicyCell(Arc<RwLock<Policy>>);

impl PolicyCell {
    /// A cell holding `policy`.
    pub fn new(policy: Policy) -> Self {
        Self(Arc::new(RwLock::new(policy)))
    }

    /// The policy now.
    pub fn get(&self) -> Policy {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the policy; returns whether it changed.
    pub fn set(&self, policy: Policy) -> bool {
        let mut current = self.0.write().unwrap_or_else(|e| e.into_inner());
        let changed = *current != policy;
        *current = policy;
        changed
    }
}

impl fmt::Debug for PolicyCell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PolicyCell").field(&self.get()).finish()
    }
}

/// What a start function gets for one incarnation.
#[derive(Clone)]
pub struct ChildContext {
    /// The supervisor to link the new actor to.
    pub supervisor: ActorCell,
    /// The child's path, e.g. `root/channels/matrix/nova/client`.
    pub path: String,
    /// The child's kind.
    pub kind: String,
    /// 1 for the first start, then one more for each restart.
    pub generation: u64,
    /// Heartbeat and readiness of this incarnation.
    pub probe: Probe,
    /// Where to ask for a process exit.
    pub exit: ExitHandle,
    /// The tree's randomness (injected in tests).
    pub jitter: Jitter,
    /// Where a child that has insides worth showing (a supervisor, the start slots)
    /// publishes them; the same channel across incarnations.
    pub(crate) inner: Arc<watch::Sender<Inner>>,
}

impl ChildContext {
    /// True for the first start, false for every restart (start-slot jitter applies only
    /// to the first).
    pub fn is_first_start(&self) -> bool {
        self.generation == 1
    }

    /// A span naming the child, for its handlers and tasks.
    pub fn span(&self) -> tracing::Span {
        tracing::info_span!("actor", actor.kind = %self.kind, actor.path = %self.path)
    }
}

/// One incarnation's heartbeat and readiness, written by the child and read by its
/// supervisor (liveness) and the admin endpoint (readiness). Cheap to clone and to call.
#[derive(Clone)]
pub struct Probe(Arc<ProbeInner>);

struct ProbeInner {
    last_beat: Mutex<Instant>,
    ready: AtomicBool,
}

impl Probe {
    pub(crate) fn new(now: Instant) -> Self {
        Self(Arc::new(ProbeInner {
            last_beat: Mutex::new(now),
            ready: AtomicBool::new(false),
        }))
    }

    /// Reports progress: resets the liveness clock.
    pub fn beat(&self) {
        let now = Instant::now();
        *self.0.last_beat.lock().unwrap_or_else(|e| e.into_inner()) = now;
    }

    /// When progress was last reported (or the incarnation started).
    pub fn last_beat(&self) -> Instant {
        *self.0.last_beat.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks this incarnation ready or not ready.
    pub fn set_ready(&self, ready: bool) {
        self.0.ready.store(ready, Ordering::Release);
    }

    /// Whether this incarnation said it is ready.
    pub fn is_ready(&self) -> bool {
        self.0.ready.load(Ordering::Acquire)
    }
}

impl fmt::Debug for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Probe")
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}
