//! `[node]`: this process as a node host, as configured, and [`NodeSettings::resolve`],
//! which turns it into the [`ConnectionConfig`] the connection actor runs with.
//!
//! Every struct denies unknown fields. Defaults are documented per field and repeated in
//! `config/warden.toml`. The program reads `token_file` in and validates the values before
//! anything resolves them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::commands::{self, CommandSpec};
use super::connection::{Admission, ConnectionConfig};

/// What `Debug` prints in place of a secret.
const MASK: &str = "****";

/// How long a node's handshake with the gateway may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `[node]`: this process also acts as a node host connected to a gateway.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    /// Gateway WebSocket URL, `ws://…` or `wss://…`. Required.
    pub gateway_url: String,
    /// Gateway token. Secret. Required, here or through `token_file`: the node
    /// authenticates with it and checks approval grants with it.
    pub token: Option<String>,
    /// File holding `token`.
    pub token_file: Option<PathBuf>,
    /// Name the node announces; `None` = the host name.
    pub name: Option<String>,
    /// Exit (for the container to restart) after being disconnected this long, in ms;
    /// 0 = never. Default 0.
    #[serde(default)]
    pub max_disconnected_ms: u64,
    /// `[node.commands.<name>]`: the only commands the node runs. Default none.
    #[serde(default)]
    pub commands: BTreeMap<String, NodeCommand>,
    /// After losing an established connection, retry within `reconnect_within_ms` for this
    /// long (plus the gateway's announced `expected_back_ms`), in ms. Default 10000.
    #[serde(default = "default_reconnect_window_ms")]
    pub reconnect_window_ms: u64,
    /// The retry interval inside that window, in ms (jittered). Default 500.
    #[serde(default = "default_reconnect_within_ms")]
    pub reconnect_within_ms: u64,
    /// Commands run at once at most (> 0). Default 4.
    #[serde(default = "default_max_concurrent_commands")]
    pub max_concurrent_commands: usize,
    /// Invocations that wait, first come first served, while that many run; more are
    /// answered `busy` at once. 0 = none wait. Default 32.
    #[serde(default = "default_max_queued_commands")]
    pub max_queued_commands: usize,
}

fn default_max_concurrent_commands() -> usize {
    4
}

fn default_max_queued_commands() -> usize {
    32
}

fn default_reconnect_window_ms() -> u64 {
    10_000
}

fn default_reconnect_within_ms() -> u64 {
    500
}

impl fmt::Debug for NodeSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeSettings")
            .field("gateway_url", &self.gateway_url)
            .field("token", &mask(&self.token))
            .field("token_file", &self.token_file)
            .field("name", &self.name)
            .field("max_disconnected_ms", &self.max_disconnected_ms)
            .field("commands", &self.commands)
            .field("reconnect_window_ms", &self.reconnect_window_ms)
            .field("reconnect_within_ms", &self.reconnect_within_ms)
            .field("max_concurrent_commands", &self.max_concurrent_commands)
            .field("max_queued_commands", &self.max_queued_commands)
            .finish()
    }
}

/// `[node.commands.<name>]`: one command a node may run.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeCommand {
    /// Program and fixed arguments, run without a shell. Required, non-empty.
    pub argv: Vec<String>,
    /// Whether callers may append arguments. Default false.
    #[serde(default)]
    pub args: bool,
    /// Whether each run needs an approval first: the node runs it only with a grant the
    /// gateway signed with the node's token for exactly this run. Default false.
    #[serde(default)]
    pub approval: bool,
    /// The run is killed (its whole process group) after this long, in ms, counted from
    /// its start. Default 60000.
    #[serde(default = "default_command_timeout_ms")]
    pub timeout_ms: u64,
    /// Bytes kept of each of stdout and stderr. Default 65536.
    #[serde(default = "default_max_output_bytes")]
    pub max_output_bytes: usize,
    /// Variables set for the program, beside PATH, LANG and HOME copied from the node's
    /// environment (these win over them). Names non-empty, without `=` or NUL. Default
    /// empty.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Put callers' arguments after a literal `--`, so the program reads them as operands,
    /// never options. Default false.
    #[serde(default)]
    pub args_after_separator: bool,
    /// Accept callers' arguments that start with `-` (they may turn into options of the
    /// program). When false, such an argument is refused with `bad_request`, unless
    /// `args_after_separator` is set. Default false.
    #[serde(default)]
    pub allow_option_args: bool,
}

fn default_max_output_bytes() -> usize {
    64 * 1024
}

fn default_command_timeout_ms() -> u64 {
    60_000
}

/// Masks a secret for `Debug`.
fn mask(secret: &Option<String>) -> Option<&'static str> {
    secret.as_ref().map(|_| MASK)
}

impl NodeSettings {
    /// The connection's runtime config. `env` looks a variable up in the node host's own
    /// environment (each command gets `PATH`, `LANG` and `HOME` from it); `host_name` names
    /// a node without `name`.
    pub fn resolve(
        &self,
        env: impl Fn(&str) -> Option<String>,
        host_name: impl FnOnce() -> String,
    ) -> ConnectionConfig {
        let commands: BTreeMap<String, CommandSpec> = self
            .commands
            .iter()
            .map(|(name, command)| (name.clone(), command.resolve(&env)))
            .collect();
        ConnectionConfig {
            gateway_url: self.gateway_url.clone(),
            // Config validation refuses a [node] without a token.
            token: self.token.clone().unwrap_or_default(),
            name: self.name.clone().unwrap_or_else(host_name),
            commands: Arc::new(commands),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            reconnect_window: Duration::from_millis(self.reconnect_window_ms),
            reconnect_within: Duration::from_millis(self.reconnect_within_ms),
        }
    }

    /// The limits on running and queued commands (and the record of used grants), made
    /// once and shared by every incarnation of the connection.
    pub fn admission(&self) -> Admission {
        Admission::new(self.max_concurrent_commands, self.max_queued_commands)
    }
}

impl NodeCommand {
    /// The command as the connection runs it; `env` as in [`NodeSettings::resolve`].
    pub fn resolve(&self, env: impl Fn(&str) -> Option<String>) -> CommandSpec {
        CommandSpec {
            argv: self.argv.clone(),
            args: self.args,
            approval: self.approval,
            timeout: Duration::from_millis(self.timeout_ms),
            max_output_bytes: self.max_output_bytes,
            env: commands::environment(env, &self.env),
            args_after_separator: self.args_after_separator,
            allow_option_args: self.allow_option_args,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeSettings {
        let command = NodeCommand {
            argv: vec!["uptime".into()],
            args: true,
            approval: true,
            timeout_ms: 1500,
            max_output_bytes: 100,
            env: BTreeMap::from([("TZ".to_string(), "UTC".to_string())]),
            args_after_separator: true,
            allow_option_args: true,
        };
        NodeSettings {
            gateway_url: "ws://127.0.0.1:18789/ws".into(),
            token: Some("node-secret".into()),
            token_file: None,
            name: None,
            max_disconnected_ms: 0,
            commands: BTreeMap::from([("uptime".to_string(), command)]),
            reconnect_window_ms: 7000,
            reconnect_within_ms: 300,
            max_concurrent_commands: 4,
            max_queued_commands: 32,
        }
    }

    #[test]
    fn a_node_resolves_to_its_connection_config() {
        let env = |key: &str| (key == "PATH").then(|| "/usr/bin".to_string());
        let config = node().resolve(env, || "box".to_string());
        assert_eq!(config.gateway_url, "ws://127.0.0.1:18789/ws");
        assert_eq!(config.token, "node-secret");
        assert_eq!(config.name, "box");
        assert_eq!(config.handshake_timeout, HANDSHAKE_TIMEOUT);
        assert_eq!(config.reconnect_window, Duration::from_millis(7000));
        assert_eq!(config.reconnect_within, Duration::from_millis(300));
        let uptime = &config.commands["uptime"];
        assert_eq!(uptime.argv, ["uptime"]);
        assert!(uptime.args && uptime.approval);
        assert!(uptime.args_after_separator && uptime.allow_option_args);
        assert_eq!(uptime.timeout, Duration::from_millis(1500));
        assert_eq!(uptime.max_output_bytes, 100);
        let expected =
            [("PATH", "/usr/bin"), ("TZ", "UTC")].map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(uptime.env, BTreeMap::from(expected));

        let named = NodeSettings {
            name: Some("build-box".into()),
            ..node()
        };
        let config = named.resolve(|_| None, || unreachable!("the node has a name"));
        assert_eq!(config.name, "build-box");
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let text = format!("{:?}", node());
        assert!(!text.contains("node-secret"), "{text}");
        assert!(text.contains(MASK), "{text}");
    }
}
