//! warden, the program: CLI, config loading, wiring the tree, admin HTTP, telemetry.
//!
//! The binary (`src/main.rs`) is thin; everything it does is here so the integration
//! tests can drive it. The supervision kernel and the actors are in `warden-actors`.

pub mod admin;
pub mod call;
pub mod cli;
pub mod config;
pub mod node;
pub mod program;
pub mod reload;
pub mod run;
pub mod telemetry;
pub mod token;
