//! The command line: `warden run | tree | health | call | config show|check`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::admin;
use crate::call::{self, CallRequest};
use crate::config::{self, ConfigSources, EXIT_CONFIG, Flag, Loaded};
use crate::run;

/// warden keeps a multi-account chat-agent gateway alive: every long-lived part is a
/// supervised actor with bounded, jittered restarts.
#[derive(Debug, Parser)]
#[command(name = "warden", version, about)]
pub struct Cli {
    /// Config file (default: $WARDEN_CONFIG, else config/warden.toml when present).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway: the supervision tree, the gateway listener and the admin endpoint.
    Run(RunFlags),
    /// Run as a node host: connect to the gateway of `[node]` and run its declared
    /// commands; reconnects through its supervisor, forever, logging every attempt.
    Node(RunFlags),
    /// Print the live supervision tree from the admin endpoint.
    Tree(AdminFlags),
    /// Reload the config of a running `warden run` (like SIGHUP): prints what changed and
    /// what needs a restart; exit 64 when the new config is invalid (nothing changed).
    Reload(AdminFlags),
    /// Exit 0 when the admin endpoint's /healthz answers 200, else 1 (for HEALTHCHECK).
    Health(AdminFlags),
    /// Call a gateway method and print its JSON result; retries while the gateway is
    /// restarting, never re-sends a request that may have been delivered unless it is
    /// read-only.
    Call(CallFlags),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

/// Flags of `warden run` and `warden node`; each overrides its config key (a node ignores
/// `--gateway-bind`).
#[derive(Debug, Args, Default)]
pub struct RunFlags {
    /// gateway.bind
    #[arg(long, value_name = "ADDR")]
    pub gateway_bind: Option<String>,
    /// admin.bind
    #[arg(long, value_name = "ADDR")]
    pub admin_bind: Option<String>,
    /// state.dir
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<String>,
    /// telemetry.log_format: pretty or json
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// telemetry.log_filter, e.g. "info,warden_actors=debug"
    #[arg(long, value_name = "FILTER")]
    pub log_filter: Option<String>,
}

/// Where the admin endpoint is.
#[derive(Debug, Args)]
pub struct AdminFlags {
    /// Admin endpoint URL (default: from admin.bind in the config).
    #[arg(long, value_name = "URL")]
    pub admin: Option<String>,
    /// Bearer token (default: admin.token from the config).
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
}

/// Flags of `warden call`.
#[derive(Debug, Args)]
pub struct CallFlags {
    /// The method: health, status, tree, nodes.list, nodes.invoke, chat.send, approvals.*
    #[arg(value_name = "METHOD")]
    pub method: String,
    /// Its params, a JSON object (default {}).
    #[arg(long, value_name = "JSON")]
    pub params: Option<String>,
    /// Gateway URL (default: ws:// + gateway.bind + /ws from the config).
    #[arg(long, value_name = "URL")]
    pub gateway: Option<String>,
    /// Gateway token (default: gateway.token from the config, else the token `warden run`
    /// generated in <state.dir>/gateway.token).
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Give up after this many seconds, retries included.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_secs)]
    pub timeout: Duration,
}

/// `warden config …`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective config, the source of every value, secrets masked.
    Show,
    /// Validate the config: exit 0 when it is valid, 64 with the error when not.
    Check,
}

impl RunFlags {
    fn flags(&self) -> Vec<Flag> {
        let pairs = [
            ("gateway.bind", "--gateway-bind", &self.gateway_bind),
            ("admin.bind", "--admin-bind", &self.admin_bind),
            ("state.dir", "--state-dir", &self.state_dir),
            ("telemetry.log_format", "--log-format", &self.log_format),
            ("telemetry.log_filter", "--log-filter", &self.log_filter),
        ];
        pairs
            .into_iter()
            .filter_map(|(key, name, value)| value.clone().map(|value| Flag { key, value, name }))
            .collect()
    }
}

/// Runs the command line; returns the process exit code.
pub fn main(cli: Cli) -> i32 {
    match cli.command {
        Command::Run(ref flags) | Command::Node(ref flags) => {
            let node = matches!(cli.command, Command::Node(_));
            let sources = ConfigSources {
                path: cli.config.clone(),
                flags: flags.flags(),
            };
            let loaded = match config::load(&sources) {
                Ok(loaded) => loaded,
                Err(e) => return fail(&e.to_string(), e.exit_code()),
            };
            match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) if node => rt.block_on(crate::node::run(loaded)),
                Ok(rt) => rt.block_on(run::run(loaded)),
                Err(e) => fail(&format!("cannot start the async runtime: {e}"), 70),
            }
        }
        Command::Tree(ref flags) => client(&cli, flags, |url, token| async move {
            match admin::fetch_tree_text(&url, token.as_deref()).await {
                Ok(text) => {
                    out(&text);
                    0
                }
                Err(e) => fail(&e.to_string(), 1),
            }
        }),
        Command::Reload(ref flags) => client(&cli, flags, |url, token| async move {
            match admin::request_reload(&url, token.as_deref()).await {
                Ok(text) => {
                    out(&text);
                    0
                }
                Err(admin::ClientError::Status {
                    status: 400,
                    message,
                    ..
                }) => fail(&message, EXIT_CONFIG),
                Err(e @ admin::ClientError::Status { status: 401, .. }) => fail(
                    &format!(
                        "{e} (a changed admin.token applies only after a restart: pass the running one with --token)"
                    ),
                    1,
                ),
                Err(e) => fail(&e.to_string(), 1),
            }
        }),
        Command::Health(ref flags) => client(&cli, flags, |url, _| async move {
            match admin::check_health(&url).await {
                Ok(()) => 0,
                Err(e) => fail(&e.to_string(), 1),
            }
        }),
        Command::Call(ref flags) => call_command(&cli, flags),
        Command::Config(ref sub) => {
            let sources = ConfigSources {
                path: cli.config.clone(),
                flags: Vec::new(),
            };
            match (config::load(&sources), sub) {
                (Err(e), _) => fail(&e.to_string(), e.exit_code()),
                (Ok(loaded), ConfigCommand::Show) => {
                    out(&loaded.render_show());
                    0
                }
                (Ok(loaded), ConfigCommand::Check) => {
                    let from = loaded
                        .file()
                        .map_or("built-in defaults and environment".to_string(), |f| {
                            format!("{} (with defaults and environment)", f.display())
                        });
                    out(&format!("config ok: {from}\n"));
                    0
                }
            }
        }
    }
}

/// Resolves the admin URL and token (flags first, then config) and runs `f` on a small
/// runtime.
fn client<F, Fut>(cli: &Cli, flags: &AdminFlags, f: F) -> i32
where
    F: FnOnce(String, Option<String>) -> Fut,
    Fut: std::future::Future<Output = i32>,
{
    let loaded = config::load(&ConfigSources {
        path: cli.config.clone(),
        flags: Vec::new(),
    });
    let (url, token) = match (&flags.admin, loaded) {
        (Some(url), loaded) => {
            let token = flags
                .token
                .clone()
                .or_else(|| loaded.ok().and_then(|l| l.config.admin.token));
            (url.clone(), token)
        }
        (None, Ok(loaded)) => (
            admin_url(&loaded),
            flags.token.clone().or(loaded.config.admin.token),
        ),
        (None, Err(e)) => return fail(&format!("{e} (or pass --admin URL)"), EXIT_CONFIG),
    };
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f(url, token)),
        Err(e) => fail(&format!("cannot start the async runtime: {e}"), 70),
    }
}

/// `warden call`: params first (exit 64 when not an object), then the URL and token (flags
/// first, then config), then the call with its retries; each retry is a line on stderr.
fn call_command(cli: &Cli, flags: &CallFlags) -> i32 {
    let params = match call::parse_params(flags.params.as_deref()) {
        Ok(params) => params,
        Err(e) => return fail(&e, EXIT_CONFIG),
    };
    let loaded = config::load(&ConfigSources {
        path: cli.config.clone(),
        flags: Vec::new(),
    });
    // The token: --token, else gateway.token, else the one `warden run` generated under
    // state.dir when no operator is configured.
    let configured = |loaded: &Loaded| {
        let config = &loaded.config;
        config.gateway.token.clone().or_else(|| {
            crate::token::read(&crate::token::path(&config.state.dir))
                .ok()
                .flatten()
        })
    };
    let (url, token) = match (&flags.gateway, loaded) {
        (Some(url), loaded) => {
            let token = flags
                .token
                .clone()
                .or_else(|| loaded.ok().and_then(|l| configured(&l)));
            (url.clone(), token)
        }
        (None, Ok(loaded)) => (
            format!("ws://{}/ws", loopback(loaded.config.gateway.bind)),
            flags.token.clone().or_else(|| configured(&loaded)),
        ),
        (None, Err(e)) => return fail(&format!("{e} (or pass --gateway URL)"), EXIT_CONFIG),
    };
    let request = CallRequest {
        url,
        token: token.unwrap_or_default(),
        method: flags.method.clone(),
        params: crate::call::with_txn_id(&flags.method, params),
        timeout: flags.timeout,
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}"), 70),
    };
    let log = |line: &str| {
        let _ = writeln!(std::io::stderr(), "warden: {line}");
    };
    match rt.block_on(call::call(&request, log)) {
        Ok(value) => {
            let text = serde_json::to_string_pretty(&value).unwrap_or_else(|_| value.to_string());
            out(&format!("{text}\n"));
            0
        }
        Err(e) => fail(&e.to_string(), 1),
    }
}

/// `--timeout SECS`: a positive number of seconds.
fn parse_secs(text: &str) -> Result<Duration, String> {
    match text.parse::<f64>() {
        Ok(secs) if secs > 0.0 => {
            Duration::try_from_secs_f64(secs).map_err(|e| format!("{text}: {e}"))
        }
        _ => Err(format!("{text:?} is not a positive number of seconds")),
    }
}

/// `http://` + admin.bind, with an unspecified address replaced by loopback.
fn admin_url(loaded: &Loaded) -> String {
    format!("http://{}", loopback(loaded.config.admin.bind))
}

/// `addr`, with an unspecified IP replaced by loopback.
fn loopback(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    addr
}

fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// Prints `warden: message` to stderr and returns `code`.
fn fail(message: &str, code: i32) -> i32 {
    let _ = writeln!(std::io::stderr(), "warden: {message}");
    code
}
