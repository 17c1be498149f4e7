//! The tree snapshot: the admin API's payload, and its drawing as text.
//!
//! These are wire types, kept apart from the supervisor's internal records so a change
//! inside the kernel never changes the API by accident.

use std::fmt::Write as _;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The state of one node of the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Spawned; its `post_start` has not finished.
    Starting,
    /// Running.
    Running,
    /// Failed; waiting for its backoff delay before the next start.
    BackingOff,
    /// Gave up (budget spent or fatal failure); stays down until an operator starts it.
    Parked,
    /// Being stopped.
    Stopping,
    /// Stopped on purpose (operator, normal exit of a transient child, shutdown).
    Stopped,
}

impl NodeState {
    /// The snake-case name, as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Starting => "starting",
            NodeState::Running => "running",
            NodeState::BackingOff => "backing_off",
            NodeState::Parked => "parked",
            NodeState::Stopping => "stopping",
            NodeState::Stopped => "stopped",
        }
    }

    /// Every state, for gauges.
    pub const ALL: [NodeState; 6] = [
        NodeState::Starting,
        NodeState::Running,
        NodeState::BackingOff,
        NodeState::Parked,
        NodeState::Stopping,
        NodeState::Stopped,
    ];
}

/// When a node is brought back after it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartKind {
    /// Always.
    Permanent,
    /// Only after a failure.
    Transient,
    /// Never.
    Temporary,
}

impl RestartKind {
    /// The snake-case name, as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartKind::Permanent => "permanent",
            RestartKind::Transient => "transient",
            RestartKind::Temporary => "temporary",
        }
    }
}

/// One node of the tree and everything below it.
///
/// Strings that do not change while a node runs are shared (`Arc<str>`), so reading a large
/// tree allocates little more than its `children` vectors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSnapshot {
    /// Full path, e.g. `root/gateway/listener`.
    pub path: Arc<str>,
    /// Last path segment.
    pub id: Arc<str>,
    /// The child's kind (`supervisor`, `start_slots`, `matrix_account`, …).
    pub kind: Arc<str>,
    /// Its state.
    pub state: NodeState,
    /// `permanent`, `transient` or `temporary`.
    pub restart: RestartKind,
    /// For supervisors: `one_for_one`, `one_for_all` or `rest_for_one`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// Incarnation number: 1 for the first start, +1 per start after that.
    pub generation: u64,
    /// Restarts over the child's whole life.
    pub restarts_total: u64,
    /// Failures inside the current budget window (with an unlimited budget, counted up to
    /// 256).
    pub restarts_in_window: u64,
    /// Failures in a row since the child last ran `reset_after` without failing.
    pub consecutive_failures: u32,
    /// `<label or path> failed <n> times in a row: <reason>` while the failures in a row
    /// are at least the policy's `warn_after`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// The last failure, if any.
    pub last_failure: Option<FailureSnapshot>,
    /// When backing off: how long until the next start.
    pub next_restart_in_ms: Option<u64>,
    /// When the current incarnation started (RFC 3339), if it runs.
    pub started_at: Option<Arc<str>>,
    /// How long the current incarnation has run, if it runs.
    pub uptime_ms: Option<u64>,
    /// Running, and (for children that report it) said it is ready.
    pub ready: bool,
    /// Start-slot pools, for the start-slot actor.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolSnapshot>,
    /// Children, in start order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<NodeSnapshot>,
}

/// A recorded failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureSnapshot {
    /// `transient`, `fatal` or `hung`.
    pub class: String,
    /// What went wrong.
    pub reason: String,
    /// When (RFC 3339).
    pub at: String,
}

/// One start-slot pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSnapshot {
    /// The pool's name.
    pub name: String,
    /// How many may hold a slot at once.
    pub max_concurrent: usize,
    /// Current holders.
    pub holders: Vec<HolderSnapshot>,
    /// The most holders seen at once since the pool started.
    pub peak_holders: usize,
    /// How many wait in the queue.
    pub queue_len: usize,
    /// The first waiters in the queue, in order (at most 16 are listed).
    pub queue: Vec<String>,
}

/// A current slot holder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HolderSnapshot {
    /// Who holds it (usually a path).
    pub holder: String,
    /// For how long.
    pub held_ms: u64,
}

impl NodeSnapshot {
    /// Finds a node by full path.
    pub fn find(&self, path: &str) -> Option<&NodeSnapshot> {
        if &*self.path == path {
            return Some(self);
        }
        let rest = path.strip_prefix(&*self.path)?.strip_prefix('/')?;
        let next = rest.split('/').next()?;
        self.children.iter().find(|c| &*c.id == next)?.find(path)
    }

    /// Every node, depth first, this one included.
    pub fn walk(&self) -> Vec<&NodeSnapshot> {
        let mut out = vec![self];
        for child in &self.children {
            out.extend(child.walk());
        }
        out
    }

    /// Paths that keep the tree from being ready: permanent children that are not
    /// running, and children that report readiness and have not (below a node that is
    /// down, only that node is named).
    pub fn not_ready(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_not_ready(&mut out);
        out
    }

    fn collect_not_ready(&self, out: &mut Vec<String>) {
        for child in &self.children {
            let must_run = child.restart == RestartKind::Permanent;
            if !child.ready && (must_run || child.state == NodeState::Running) {
                out.push(child.path.to_string());
            } else {
                child.collect_not_ready(out);
            }
        }
    }

    /// Draws the tree as text, one line per node.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        self.render_into(&mut out, "", "");
        out
    }

    fn render_into(&self, out: &mut String, first: &str, rest: &str) {
        let _ = write!(
            out,
            "{first}{}  {}  {}",
            self.id,
            self.state.as_str(),
            self.restart.as_str()
        );
        if let Some(strategy) = &self.strategy {
            let _ = write!(out, "  {strategy}");
        }
        if &*self.kind != super::supervisor::KIND {
            let _ = write!(out, "  [{}]", self.kind);
        }
        let _ = write!(out, "  gen {}", self.generation);
        if self.restarts_total > 0 {
            let _ = write!(
                out,
                "  restarts {} ({} in window)",
                self.restarts_total, self.restarts_in_window
            );
        }
        if let Some(ms) = self.uptime_ms {
            let _ = write!(out, "  up {}", human_ms(ms));
        }
        if let Some(ms) = self.next_restart_in_ms {
            let _ = write!(out, "  next start in {}", human_ms(ms));
        }
        if self.state == NodeState::Running && !self.ready {
            out.push_str("  not ready");
        }
        if let Some(f) = &self.last_failure {
            let _ = write!(out, "  last failure: {}: {} at {}", f.class, f.reason, f.at);
        }
        if let Some(warning) = &self.warning {
            let _ = write!(out, "  WARNING: {warning}");
        }
        out.push('\n');
        for pool in &self.pools {
            let holders: Vec<String> = pool
                .holders
                .iter()
                .map(|h| format!("{} {}", h.holder, human_ms(h.held_ms)))
                .collect();
            let _ = writeln!(
                out,
                "{rest}    pool {}: {}/{} held [{}], {} queued",
                pool.name,
                pool.holders.len(),
                pool.max_concurrent,
                holders.join(", "),
                pool.queue_len
            );
        }
        let n = self.children.len();
        for (i, child) in self.children.iter().enumerate() {
            let last = i + 1 == n;
            let (branch, indent) = if last {
                ("└── ", "    ")
            } else {
                ("├── ", "│   ")
            };
            child.render_into(out, &format!("{rest}{branch}"), &format!("{rest}{indent}"));
        }
    }
}

/// `1234` → `1.2s`, `61000` → `1m1s`.
fn human_ms(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000),
        _ => format!("{}h{}m", ms / 3_600_000, (ms % 3_600_000) / 60_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(path: &str, state: NodeState, restart: &str, ready: bool) -> NodeSnapshot {
        NodeSnapshot {
            path: path.into(),
            id: path.rsplit('/').next().unwrap_or(path).into(),
            kind: "test".into(),
            state,
            restart: match restart {
                "permanent" => RestartKind::Permanent,
                _ => RestartKind::Transient,
            },
            strategy: None,
            generation: 1,
            restarts_total: 0,
            restarts_in_window: 0,
            consecutive_failures: 0,
            warning: None,
            last_failure: None,
            next_restart_in_ms: None,
            started_at: None,
            uptime_ms: None,
            ready,
            pools: vec![],
            children: vec![],
        }
    }

    #[test]
    fn not_ready_names_down_permanent_children_and_unready_reporters() {
        let mut root = node("root", NodeState::Running, "permanent", true);
        let mut gw = node("root/gw", NodeState::Running, "permanent", true);
        gw.children
            .push(node("root/gw/a", NodeState::BackingOff, "permanent", false));
        gw.children
            .push(node("root/gw/b", NodeState::Stopped, "transient", false));
        gw.children
            .push(node("root/gw/c", NodeState::Running, "transient", false));
        let mut parked = node("root/p", NodeState::Parked, "permanent", false);
        parked
            .children
            .push(node("root/p/x", NodeState::Stopped, "permanent", false));
        root.children = vec![gw, parked];
        assert_eq!(root.not_ready(), ["root/gw/a", "root/gw/c", "root/p"]);
        assert_eq!(root.find("root/gw/c").map(|n| &*n.id), Some("c"));
        assert!(root.find("root/gw/zz").is_none());
        assert!(root.find("rootx").is_none());
    }

    #[test]
    fn text_draws_branches() {
        let mut root = node("root", NodeState::Running, "permanent", true);
        root.children
            .push(node("root/a", NodeState::Running, "permanent", true));
        let mut b = node("root/b", NodeState::BackingOff, "permanent", false);
        b.next_restart_in_ms = Some(1500);
        b.children
            .push(node("root/b/c", NodeState::Stopped, "permanent", false));
        root.children.push(b);
        let text = root.render_text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[1].starts_with("├── a  running"), "{text}");
        assert!(
            lines[2].starts_with("└── b  backing_off") && lines[2].contains("next start in 1.5s"),
            "{text}"
        );
        assert!(lines[3].starts_with("    └── c  stopped"), "{text}");
    }
}
