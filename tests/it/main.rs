//! warden's integration tests: one binary, one module per area.

mod admin;
mod config;
mod process;
