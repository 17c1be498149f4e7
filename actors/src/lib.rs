//! warden-actors: the supervision kernel and every supervised actor of warden.
//!
//! * [`supervision`] — the generic kernel: supervisors, restart policy, backoff, start
//!   slots, liveness and the live tree snapshot. It knows nothing about any domain.
//!
//! * [`serve`] — an HTTP server as a supervised actor (used by the gateway and admin).
//! * [`node`] — the node host's command runner (the connection actor: issue 4).
//! * [`gateway`] — the gateway listener (protocol and sessions: issue 4).
//! * [`matrix`] — Matrix accounts (the only module that imports `matrix_sdk`).
//! * [`task`] — owned tasks: `AbortOnDrop`, and a spawn that reports a task's end to its owner.
//!
//! Domain actors (gateway, node, Matrix, approvals) live in their own modules beside it,
//! each classifying its errors into [`supervision::Failure`]s and leaving every retry to
//! its supervisor.

pub mod gateway;
pub mod matrix;
pub mod node;
pub mod serve;
pub mod supervision;
pub mod task;
