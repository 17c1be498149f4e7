//! The supervision kernel: generic supervisors on ractor, and nothing about Matrix,
//! gateways or nodes.
//!
//! * [`policy`] — restart kinds, failure classes, budgets, and [`decide`], the one function
//!   that decides every restart.
//! * [`backoff`] — bounded, jittered exponential delays and the injectable randomness.
//! * [`supervisor`] — the supervisor actor: strategies, dynamic children, generations,
//!   liveness, ordered shutdown, operator actions.
//! * [`slots`] — the start-slot actor: FIFO pools that admit starts a few at a time.
//! * [`snapshot`] / `view` — the live tree, published lock-free and read without messaging.
//! * [`tree`] — a running tree: start, snapshot, control, shutdown.
//! * [`settings`] — the config shape of policies and pools, with their defaults.
//! * [`exit`] — how a child asks the program to exit (75: budget spent, 78: fatal).
//! * [`metrics`] — every metric name the kernel records.
//!
//! **Architecture Invariant:** nothing here names a domain (Matrix, gateway, node); domain
//! actors classify their own errors into [`Failure`]s.

pub mod backoff;
pub mod child;
pub mod exit;
pub mod metrics;
pub mod policy;
pub mod settings;
pub mod slots;
pub mod snapshot;
pub mod supervisor;
pub mod tree;
mod view;

#[cfg(test)]
mod tests;

pub use backoff::{Backoff, Jitter, JitterSource};
pub use child::{ChildContext, ChildSpec, PolicyCell, Probe, Readiness};
pub use exit::{ExitHandle, ExitRequest};
pub use policy::{
    Action, Decision, EXIT_BUDGET_EXHAUSTED, EXIT_FATAL, Exit, Failure, FailureClass, History,
    Policy, Restart, decide,
};
pub use slots::{PoolSettings, SlotClient, SlotError, SlotGuard};
pub use snapshot::{FailureSnapshot, HolderSnapshot, NodeSnapshot, NodeState, PoolSnapshot};
pub use supervisor::{ChildSet, ControlAction, Strategy, SupervisorError};
pub use tree::{ROOT, ShutdownReport, SupervisorRef, Tree, TreeHandle, TreeOptions};
