//! warden-actors: the supervision kernel and every supervised actor of warden.
//!
//! * [`supervision`] — the generic kernel: supervisors, restart policy, backoff, start
//!   slots, liveness and the live tree snapshot. It knows nothing about any domain.
//!
//! * [`serve`] — an HTTP server as a supervised actor (used by the gateway and admin).
//! * [`node`] — the node host: its connection to the gateway and the command runner.
//! * [`gateway`] — the gateway: the protocol, the listener, one session per socket, the
//!   approvals broker, the node registry, and the one client of the protocol.
//! * [`matrix`] — Matrix accounts (the only module that imports `matrix_sdk`).
//! * [`inbox`] — the durable inbox: inbound messages stored before their sync position
//!   moves, replayed to operators that were away; idempotent `chat.send`.
//! * [`task`] — owned tasks: `AbortOnDrop`, and a spawn that reports a task's end to its owner.
//!
//! Domain actors (gateway, node, Matrix, approvals) live in their own modules beside it,
//! each classifying its errors into [`supervision::Failure`]s and leaving every retry to
//! its supervisor.

pub mod gateway;
pub mod inbox;
pub mod matrix;
pub mod node;
pub mod serve;
pub mod supervision;
pub mod task;

/// Registers the description of every metric this crate records (the kernel's and the
/// gateway's) with the installed recorder: call once, after installing it.
pub fn describe_metrics() {
    supervision::metrics::describe();
    gateway::metrics::describe();
    inbox::metric::describe();
}

#[cfg(test)]
mod tests {
    #[test]
    fn metric_names_are_unique_across_the_crate() {
        let all: Vec<_> = [
            super::supervision::metrics::ALL,
            super::gateway::metrics::ALL,
            super::inbox::metric::ALL,
        ]
        .concat();
        super::supervision::metrics::check_declared(&all);
    }
}
