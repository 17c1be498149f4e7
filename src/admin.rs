//! The admin HTTP endpoint: health, readiness, metrics, the tree, config, operator actions.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// `[admin]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Address of the admin endpoint. Default `127.0.0.1:18790`. A non-loopback address
    /// requires a token.
    pub bind: SocketAddr,
    /// Bearer token for everything but `/healthz` and `/readyz`. Secret.
    pub token: Option<String>,
    /// File holding `token`.
    pub token_file: Option<PathBuf>,
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self { bind: SocketAddr::from(([127, 0, 0, 1], 18790)), token: None, token_file: None }
    }
}
