//! The node host: runs declared commands for the gateway.
//!
//! * [`commands`] — runs one declared command: fixed argv, no shell, extra arguments only
//!   when the command allows them, a timeout, capped output.
//!
//! The connection actor (`warden node`) is issue 4's remaining part.

pub mod commands;
