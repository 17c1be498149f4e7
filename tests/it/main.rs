//! warden's integration tests: one binary, one module per area.

mod admin;
mod approvals;
mod call;
mod config;
mod fault_proxy;
mod gateway;
mod inbox;
mod matrix;
mod metrics_live;
mod node;
mod page;
mod process;
mod reload;
mod support;
mod synapse;
mod tidy;
mod tls;
mod webdriver;
