//! The live view each supervisor publishes, and how a snapshot is read from it.
//!
//! Every child has a `watch` channel for its insides ([`Inner`]): a supervisor publishes its
//! children there, the start-slot actor its pools. A supervisor's published children carry
//! the receivers of their own insides, so the whole tree is reachable from the root's
//! receiver without sending a message to any actor. Entries are `Arc`s: a reader holds a
//! channel's read lock only long enough to clone them, so a snapshot of a large tree never
//! stalls the supervisor that publishes it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ractor::ActorRef;
use tokio::sync::watch;
use tokio::time::Instant;

use super::child::{Probe, Readiness};
use super::policy::{FailureClass, Restart};
use super::snapshot::{FailureSnapshot, HolderSnapshot, NodeSnapshot, NodeState, PoolSnapshot};
use super::supervisor::{Strategy, SupervisorMsg};

/// What a child publishes about its insides.
#[derive(Default)]
pub enum Inner {
    /// Nothing (an ordinary actor).
    #[default]
    Leaf,
    /// A supervisor's children and its control handle.
    Supervisor(SupervisorView),
    /// The start-slot actor's pools.
    Pools(Vec<PoolView>),
}

/// A supervisor's published state.
pub struct SupervisorView {
    /// Where operator actions for its children are sent.
    pub(crate) control: ActorRef<SupervisorMsg>,
    /// Its strategy.
    pub(crate) strategy: Strategy,
    /// Its children by start order.
    pub(crate) children: BTreeMap<u64, Arc<ChildView>>,
}

/// One child as its supervisor last published it.
pub struct ChildView {
    pub(crate) id: Arc<str>,
    pub(crate) path: Arc<str>,
    pub(crate) kind: Arc<str>,
    pub(crate) restart: Restart,
    pub(crate) readiness: Readiness,
    pub(crate) state: NodeState,
    pub(crate) generation: u64,
    pub(crate) restarts_total: u64,
    pub(crate) window: Duration,
    pub(crate) failures: Vec<Instant>,
    pub(crate) consecutive: u32,
    /// Set while the failures in a row have reached the policy's `warn_after`.
    pub(crate) warning: Option<String>,
    pub(crate) last_failure: Option<FailureView>,
    pub(crate) next_restart_at: Option<Instant>,
    /// When the current incarnation started, and that time formatted once (RFC 3339).
    pub(crate) started: Option<(Instant, Arc<str>)>,
    pub(crate) probe: Probe,
    pub(crate) inner: watch::Receiver<Inner>,
}

/// A recorded failure.
#[derive(Clone)]
pub struct FailureView {
    pub(crate) class: FailureClass,
    pub(crate) reason: String,
    pub(crate) at: SystemTime,
}

/// One start-slot pool as last published.
#[derive(Clone)]
pub struct PoolView {
    pub(crate) name: Arc<str>,
    pub(crate) max_concurrent: usize,
    pub(crate) holders: Vec<(Arc<str>, Instant)>,
    pub(crate) peak_holders: usize,
    pub(crate) queue_len: usize,
    pub(crate) queue_head: Vec<Arc<str>>,
}

/// Formats a wall-clock time as RFC 3339 with milliseconds.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Builds the snapshot of the node whose insides are `inner`, given its own record.
pub(crate) fn snapshot_child(view: &ChildView, now: Instant) -> NodeSnapshot {
    let running = view.state == NodeState::Running;
    let ready = running
        && match view.readiness {
            Readiness::OnStart => true,
            Readiness::Reported => view.probe.is_ready(),
        };
    let (strategy, children, pools) = read_inner(&view.inner, now);
    NodeSnapshot {
        path: view.path.clone(),
        id: view.id.clone(),
        kind: view.kind.clone(),
        state: view.state,
        restart: view.restart.into(),
        strategy,
        generation: view.generation,
        restarts_total: view.restarts_total,
        restarts_in_window: view
            .failures
            .iter()
            .filter(|t| now.saturating_duration_since(**t) < view.window)
            .count() as u64,
        consecutive_failures: view.consecutive,
        warning: view.warning.clone(),
        last_failure: view.last_failure.as_ref().map(|f| FailureSnapshot {
            class: f.class.as_str().to_string(),
            reason: f.reason.clone(),
            at: rfc3339(f.at),
        }),
        next_restart_in_ms: match view.state {
            NodeState::BackingOff => view
                .next_restart_at
                .map(|t| t.saturating_duration_since(now).as_millis() as u64),
            _ => None,
        },
        started_at: view
            .started
            .as_ref()
            .filter(|_| is_up(view.state))
            .map(|(_, at)| at.clone()),
        uptime_ms: view
            .started
            .as_ref()
            .filter(|_| is_up(view.state))
            .map(|(t, _)| now.saturating_duration_since(*t).as_millis() as u64),
        ready,
        pools,
        children,
    }
}

fn is_up(state: NodeState) -> bool {
    matches!(
        state,
        NodeState::Starting | NodeState::Running | NodeState::Stopping
    )
}

/// Reads a node's insides: (strategy, children, pools).
pub(crate) fn read_inner(
    inner: &watch::Receiver<Inner>,
    now: Instant,
) -> (Option<String>, Vec<NodeSnapshot>, Vec<PoolSnapshot>) {
    // Hold the read lock only to clone Arcs; build outside it.
    let (strategy, children, pools) = {
        let guard = inner.borrow();
        match &*guard {
            Inner::Leaf => (None, Vec::new(), Vec::new()),
            Inner::Supervisor(s) => (
                Some(s.strategy),
                s.children.values().cloned().collect(),
                Vec::new(),
            ),
            Inner::Pools(p) => (None, Vec::new(), p.clone()),
        }
    };
    let children = children.iter().map(|c| snapshot_child(c, now)).collect();
    let pools = pools
        .into_iter()
        .map(|p| PoolSnapshot {
            name: p.name.to_string(),
            max_concurrent: p.max_concurrent,
            holders: p
                .holders
                .iter()
                .map(|(h, since)| HolderSnapshot {
                    holder: h.to_string(),
                    held_ms: now.saturating_duration_since(*since).as_millis() as u64,
                })
                .collect(),
            peak_holders: p.peak_holders,
            queue_len: p.queue_len,
            queue: p.queue_head.iter().map(|w| w.to_string()).collect(),
        })
        .collect();
    (strategy.map(|s| s.as_str().to_string()), children, pools)
}

/// The control handle of the supervisor whose insides are `inner`, if it is one.
pub(crate) fn control_of(inner: &watch::Receiver<Inner>) -> Option<ActorRef<SupervisorMsg>> {
    match &*inner.borrow() {
        Inner::Supervisor(s) => Some(s.control.clone()),
        _ => None,
    }
}

/// The insides receiver of child `id` of the supervisor whose insides are `inner`.
pub(crate) fn child_inner(
    inner: &watch::Receiver<Inner>,
    id: &str,
) -> Option<watch::Receiver<Inner>> {
    match &*inner.borrow() {
        Inner::Supervisor(s) => s
            .children
            .values()
            .find(|c| &*c.id == id)
            .map(|c| c.inner.clone()),
        _ => None,
    }
}
