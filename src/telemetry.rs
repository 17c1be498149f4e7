//! Logging and tracing: tracing-subscriber (pretty or JSON) plus optional OTLP export.

use serde::Deserialize;

/// `[telemetry]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// `pretty` (default) or `json`.
    pub log_format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG`, when set, wins. Default `info`.
    pub log_filter: String,
    /// OTLP/gRPC endpoint for traces, e.g. `http://127.0.0.1:4317`; empty = off.
    pub otlp_endpoint: String,
    /// Export and shutdown-flush timeout, in ms. Default 3000.
    pub otlp_timeout_ms: u64,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Pretty,
            log_filter: "info".to_string(),
            otlp_endpoint: String::new(),
            otlp_timeout_ms: 3000,
        }
    }
}
