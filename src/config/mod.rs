//! Layered configuration: figment layers composed into one [`Config`], with provenance.
//!
//! Layers, later wins:
//!
//! 1. built-in defaults: `config/warden.toml`, embedded ([`DEFAULTS_TOML`]), which documents
//!    every key with its default;
//! 2. a TOML file: `--config PATH`, else `$WARDEN_CONFIG`, else `config/warden.toml` when it
//!    exists in the working directory;
//! 3. environment variables `WARDEN_…`, `__` between keys
//!    (`WARDEN_SUPERVISION__DEFAULTS__BACKOFF__MAX_MS=5000`); `WARDEN_CONFIG` is not a key.
//!    Values are parsed like TOML (`5000`, `true`, `["a"]`), except string keys (tokens,
//!    passwords, addresses, paths, URLs) which are taken verbatim;
//! 4. command-line flags ([`Flag`]), parsed like environment values.
//!
//! Unknown keys are errors. A secret `x` can be given as `x_file`, a file holding it
//! (trailing newline ignored; relative to the working directory). Any error stops start-up
//! with [`EXIT_CONFIG`] and one line naming the key and its source ([`ConfigError`]).
//!
//! Code map: `settings` holds the sections owned here (the others belong to their
//! subsystems: `[gateway]` to `warden_actors::gateway`, `[matrix]` to
//! `warden_actors::matrix::settings`, `[inbox]` to `warden_actors::inbox`, `[node]` to `warden_actors::node::settings`, `[admin]`
//! to `crate::admin`, `[telemetry]` to `crate::telemetry`), `kinds` every kind of child and
//! its built-in restart policy, `layers` the figment layers and provenance, `check` secrets
//! and validation, `show` the flat listing for `config show`.

mod check;
mod kinds;
mod layers;
mod settings;
mod show;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use figment::Figment;
use serde::Deserialize;
use warden_actors::gateway::GatewaySettings;
use warden_actors::inbox::InboxSettings;
use warden_actors::supervision::settings::{PolicySettings, PoolConfig};
use warden_actors::supervision::{Policy, PoolSettings};

use crate::admin::AdminSettings;
use crate::telemetry::TelemetrySettings;

pub use kinds::{KINDS, builtin_policy};
pub use layers::DEFAULTS_TOML;
pub use settings::{ApprovalsConfig, ShutdownSettings, StateSettings, SupervisionSettings};
pub use show::ConfigEntry;
pub use warden_actors::matrix::settings::{AccountSettings, ApprovalSettings, MatrixSettings};
pub use warden_actors::node::settings::{NodeCommand, NodeSettings};

/// Process exit code for bad configuration (EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[gateway]`: the WebSocket listener.
    pub gateway: GatewaySettings,
    /// `[admin]`: the admin HTTP endpoint.
    pub admin: AdminSettings,
    /// `[state]`: durable state on disk.
    pub state: StateSettings,
    /// `[inbox]`: how long and how much of the inbound messages is kept.
    pub inbox: InboxSettings,
    /// `[telemetry]`: logs and traces.
    pub telemetry: TelemetrySettings,
    /// `[supervision]`: restart-policy layers.
    pub supervision: SupervisionSettings,
    /// `[start_slots.<pool>]`: start-slot pools by name. Default `approvals` {3, 2000,
    /// 30000} and `matrix_login` {2, 0, 30000}.
    pub start_slots: BTreeMap<String, PoolConfig>,
    /// `[matrix]`: Matrix accounts.
    pub matrix: MatrixSettings,
    /// `[approvals]`: which account notifies an approver that several accounts list.
    pub approvals: ApprovalsConfig,
    /// `[node]`: this process as a node host; `None` unless configured.
    pub node: Option<NodeSettings>,
    /// `[shutdown]`: graceful-shutdown deadline.
    pub shutdown: ShutdownSettings,
}

impl Default for Config {
    fn default() -> Self {
        let pool = |max_concurrent, jitter_ms| PoolConfig {
            max_concurrent,
            jitter_ms,
            hold_timeout_ms: 30_000,
        };
        Self {
            gateway: GatewaySettings::default(),
            admin: AdminSettings::default(),
            state: StateSettings::default(),
            inbox: InboxSettings::default(),
            telemetry: TelemetrySettings::default(),
            supervision: SupervisionSettings::default(),
            start_slots: BTreeMap::from([
                ("approvals".to_string(), pool(3, 2000)),
                ("matrix_login".to_string(), pool(2, 0)),
            ]),
            matrix: MatrixSettings::default(),
            approvals: ApprovalsConfig::default(),
            node: None,
            shutdown: ShutdownSettings::default(),
        }
    }
}

impl Config {
    /// Who approves for which account (those enabling approvals) and how approvers are
    /// notified: what the approvals broker reads.
    pub fn approval_routing(&self) -> warden_actors::gateway::ApprovalRouting {
        warden_actors::gateway::ApprovalRouting {
            approvers: self
                .matrix
                .accounts
                .iter()
                .filter(|(_, account)| account.approvals.enabled)
                .map(|(alias, account)| (alias.clone(), account.approvals.approvers.clone()))
                .collect(),
            default_account: self.approvals.default_account.clone(),
            renotify_after: std::time::Duration::from_millis(self.approvals.renotify_after_ms),
        }
    }

    /// The policy of one child: built-in kind default ← `supervision.defaults` ←
    /// `supervision.kinds.<kind>` ← `child` (e.g. an account's `supervision` table); no
    /// liveness timeout for a kind whose actors report no heartbeat.
    ///
    /// `warden config check` validates exactly this composition for every kind in
    /// [`KINDS`] and every Matrix account, so a policy returned here for a valid config
    /// never restarts without a delay.
    pub fn policy_for(&self, kind: &str, child: Option<&PolicySettings>) -> Policy {
        let layers = self.kind_layers(kind);
        let shared = layers.iter().map(|(_, layer)| *layer);
        let mut policy = shared
            .chain(child)
            .fold(builtin_policy(kind), |policy, layer| layer.apply(&policy));
        if !kinds::reports_heartbeat(kind) {
            policy.liveness_timeout = None;
        }
        policy
    }

    /// The configured policy layers of `kind` below a child's own, bottom first, each with
    /// the key it sits at: `supervision.defaults`, then `supervision.kinds.<kind>` when set.
    fn kind_layers(&self, kind: &str) -> Vec<(String, &PolicySettings)> {
        let mut layers = vec![(
            "supervision.defaults".to_string(),
            &self.supervision.defaults,
        )];
        if let Some(layer) = self.supervision.kinds.get(kind) {
            layers.push((format!("supervision.kinds.{kind}"), layer));
        }
        layers
    }

    /// The start-slot pools, by name.
    pub fn pools(&self) -> Vec<(String, PoolSettings)> {
        self.start_slots
            .iter()
            .map(|(name, pool)| (name.clone(), pool.settings()))
            .collect()
    }
}

/// A command-line flag that sets a config key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    /// The dotted key it sets, e.g. `gateway.bind`.
    pub key: &'static str,
    /// The value as typed; parsed like an environment value.
    pub value: String,
    /// The flag as the user wrote it, for messages, e.g. `--gateway-bind`.
    pub name: &'static str,
}

/// What the command line contributes to loading.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigSources {
    /// `--config PATH`: wins over `$WARDEN_CONFIG` and `config/warden.toml`.
    pub path: Option<PathBuf>,
    /// Flags that set keys; they win over every other layer.
    pub flags: Vec<Flag>,
}

/// Loads, checks and validates the configuration from `sources`, the process environment
/// and the files they name. Binds and starts nothing.
pub fn load(sources: &ConfigSources) -> Result<Loaded, ConfigError> {
    let env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned())))
        .collect();
    load_with(sources.clone(), env, None)
}

fn load_with(
    sources: ConfigSources,
    env: Vec<(String, String)>,
    pinned: Option<&Path>,
) -> Result<Loaded, ConfigError> {
    let layers::Built {
        figment,
        file,
        blank_file,
    } = layers::build(&sources, &env, pinned)?;
    let mut config: Config = figment
        .extract()
        .map_err(|e| ConfigError::extract(&figment, e))?;
    check::finish(&mut config, &figment)?;
    Ok(Loaded {
        config,
        figment,
        file,
        blank_file,
        sources,
        env,
    })
}

/// A loaded configuration and where each of its values came from.
pub struct Loaded {
    /// The effective configuration, `_file` secrets read in.
    pub config: Config,
    /// The layers, kept for provenance.
    figment: Figment,
    /// The config file read, absolute.
    file: Option<PathBuf>,
    /// Whether the file held nothing but blanks.
    blank_file: bool,
    /// What the command line gave, for a reload.
    sources: ConfigSources,
    /// The environment as at start-up, for a reload (a running process's environment does
    /// not change; its files do).
    env: Vec<(String, String)>,
}

impl fmt::Debug for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loaded")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl Loaded {
    /// Loads again from the same layers: the config file (and every `_file` secret) read
    /// anew, the environment as at start-up, the same flags. Checked like at start-up.
    ///
    /// The file is the one read at start-up, however it was found: missing now, it is an
    /// error (as with `--config`), not a quiet fall-back to the defaults. Nor is a file that
    /// had settings at start-up and is empty now taken (a file being written, most
    /// likely): an empty file would remove every account and credential.
    pub fn reload(&self) -> Result<Loaded, ConfigError> {
        let next = load_with(self.sources.clone(), self.env.clone(), self.file.as_deref())?;
        match &next.file {
            Some(file) if next.blank_file && !self.blank_file => Err(ConfigError {
                key: String::new(),
                source: format!("file {}", file.display()),
                message: "the file is empty now and was not at start-up; refused (write the \
                          whole file, then reload)"
                    .to_string(),
            }),
            _ => Ok(next),
        }
    }

    /// The TOML file used, if any, as an absolute path.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Every leaf key of the configuration as given (including defaults), in key order, with
    /// its value as TOML (secrets `"****"`) and its source. Secrets read from `x_file` show
    /// as the `x_file` path.
    pub fn entries(&self) -> Vec<ConfigEntry> {
        show::entries(&self.figment)
    }

    /// The text of `warden config show`: a header line naming the file, then
    /// `key = value   # source` per entry.
    pub fn render_show(&self) -> String {
        show::render_lines(self.file(), &self.entries())
    }
}

/// Bad configuration: which key, where its value came from, what is wrong.
///
/// Displays as one line:
/// `invalid config: admin.bind: … (from file /etc/warden.toml)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key, e.g. `supervision.defaults.backoff.max_ms`; empty when the whole file is
    /// at fault (unreadable, not TOML).
    pub key: String,
    /// Where the value came from, e.g. `environment variable WARDEN_ADMIN__BIND`.
    pub source: String,
    /// What is wrong, one line.
    pub message: String,
}

impl ConfigError {
    /// An error at `key`, its source looked up in `figment`.
    fn at(figment: &Figment, key: String, message: String) -> Self {
        let source =
            layers::source_of(figment, &key).unwrap_or_else(|| "unknown source".to_string());
        Self {
            key,
            source,
            message,
        }
    }

    /// Converts figment's first extraction error, finding the full key and its source.
    fn extract(figment: &Figment, e: figment::Error) -> Self {
        use figment::error::Kind;
        let mut path = e.path.clone();
        if let Kind::MissingField(field) = &e.kind {
            path.push(field.to_string());
        }
        let key = path.join(".");
        let source = layers::source_of(figment, &key)
            .or_else(|| e.metadata.as_ref().map(|md| md.name.to_string()))
            .unwrap_or_else(|| "unknown source".to_string());
        let one_of = |names: &[&str]| format!("`{}`", names.join("`, `"));
        let message = match &e.kind {
            Kind::UnknownField(field, []) => format!("unknown key `{field}`"),
            Kind::UnknownField(field, known) => {
                format!("unknown key `{field}`, expected one of {}", one_of(known))
            }
            Kind::UnknownVariant(found, known) => {
                format!("unknown value `{found}`, expected one of {}", one_of(known))
            }
            Kind::InvalidValue(found, expected) => {
                format!("invalid value: found {found}, expected {expected}")
            }
            other => layers::one_line(&other.to_string()),
        };
        Self {
            key,
            source,
            message,
        }
    }

    /// The process exit code for this error: always [`EXIT_CONFIG`].
    pub fn exit_code(&self) -> i32 {
        EXIT_CONFIG
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid config: ")?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        let message = self.message.replace(['\n', '\r'], " ");
        write!(f, "{message} (from {})", self.source)
    }
}

impl std::error::Error for ConfigError {}
