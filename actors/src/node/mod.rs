//! The node host: runs declared commands for the gateway.
//!
//! * [`commands`] — runs one declared command: fixed argv, no shell, extra arguments only
//!   when the command allows them, a timeout, capped output.
//!
//! * [`connection`] — the connection actor: the supervisor's restart is its reconnect.

pub mod commands;
pub mod connection;
