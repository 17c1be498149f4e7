//! The gateway: listener, sessions and (later) the wire protocol.
//!
//! This version has the listener actor with `GET /health`; the WebSocket protocol, sessions
//! and node registry are issue 4 and answer `/ws` with 501 until then.

pub mod listener;
pub mod protocol;

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// `[gateway]` settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    /// Address of the WebSocket listener. Default `127.0.0.1:18789`.
    pub bind: SocketAddr,
    /// Shared token clients present in `connect`. Secret.
    pub token: Option<String>,
    /// File holding `token` (trailing newline ignored).
    pub token_file: Option<PathBuf>,
    /// A socket that has not completed `connect` by then is closed (4408). Default 10000.
    pub handshake_timeout_ms: u64,
    /// Handshaking sockets allowed per client IP; more get HTTP 503. Default 32.
    pub max_preauth_per_ip: u32,
    /// Interval of `tick` events. Default 30000.
    pub tick_interval_ms: u64,
    /// Largest frame after `hello-ok`, in bytes. Default 1 MiB.
    pub max_frame_bytes: usize,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 18789)),
            token: None,
            token_file: None,
            handshake_timeout_ms: 10_000,
            max_preauth_per_ip: 32,
            tick_interval_ms: 30_000,
            max_frame_bytes: 1 << 20,
        }
    }
}
