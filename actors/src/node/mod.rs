//! The node host: runs declared commands for the gateway.
//!
//! * [`commands`] — runs one declared command: fixed argv, no shell, extra arguments only
//!   when the command allows them, a timeout, capped output.
//!
//! * [`connection`] — the connection actor: the supervisor's restart is its reconnect.
//!
//! * [`settings`] — `[node]` as configured ([`settings::NodeSettings`]) and how it resolves
//!   into the connection's config.

pub mod commands;
pub mod connection;
pub mod settings;
