//! What is checked after extraction: `_file` secrets are read in, then values are validated.
//!
//! Each error names the full key and where its value came from, found through the
//! figment's provenance.

use std::net::SocketAddr;
use std::path::Path;

use figment::Figment;
use warden_actors::matrix;
use warden_actors::node::commands;
use warden_actors::supervision::settings::{PolicyProblem, PolicySettings, validate_effective};

use super::kinds::KINDS;
use super::{Config, ConfigError};

/// Checks a freshly extracted `config`: replaces every `x_file` secret with the file's
/// contents, then validates values.
pub(super) fn finish(config: &mut Config, figment: &Figment) -> Result<(), ConfigError> {
    let err = |key: String, message: String| ConfigError::at(figment, key, message);
    read_secrets(config, &err)?;
    validate(config, &err)
}

/// Reads every `x_file` into `x`.
fn read_secrets(
    config: &mut Config,
    err: &impl Fn(String, String) -> ConfigError,
) -> Result<(), ConfigError> {
    let g = &mut config.gateway;
    read_secret("gateway.token", &mut g.token, g.token_file.as_deref(), err)?;
    for (section, map) in [("operators", &mut g.operators), ("nodes", &mut g.nodes)] {
        for (name, credential) in map.iter_mut() {
            let key = format!("gateway.{section}.{name}.token");
            let file = credential.token_file.clone();
            read_secret(&key, &mut credential.token, file.as_deref(), err)?;
            if credential.token.is_none() {
                let msg = "needs token or token_file".to_string();
                return Err(err(format!("gateway.{section}.{name}"), msg));
            }
        }
    }
    let a = &mut config.admin;
    read_secret("admin.token", &mut a.token, a.token_file.as_deref(), err)?;
    if let Some(n) = &mut config.node {
        read_secret("node.token", &mut n.token, n.token_file.as_deref(), err)?;
    }
    for (alias, acc) in &mut config.matrix.accounts {
        let key = |field: &str| format!("matrix.accounts.{alias}.{field}");
        read_secret(
            &key("password"),
            &mut acc.password,
            acc.password_file.as_deref(),
            err,
        )?;
        let file = acc.access_token_file.as_deref();
        read_secret(&key("access_token"), &mut acc.access_token, file, err)?;
        let file = acc.recovery_key_file.as_deref();
        read_secret(&key("recovery_key"), &mut acc.recovery_key, file, err)?;
    }
    Ok(())
}

/// Fills the secret at `key` from `file`, if given: one of the two, never both.
fn read_secret(
    key: &str,
    secret: &mut Option<String>,
    file: Option<&Path>,
    err: &impl Fn(String, String) -> ConfigError,
) -> Result<(), ConfigError> {
    if secret.as_deref() == Some("") {
        return Err(err(
            key.to_string(),
            "is empty; give a value or leave it unset".to_string(),
        ));
    }
    let Some(file) = file else { return Ok(()) };
    let file_key = format!("{key}_file");
    if secret.is_some() {
        return Err(err(
            file_key,
            format!("{key} is also set; give one of the two"),
        ));
    }
    let text = std::fs::read_to_string(file).map_err(|e| {
        err(
            file_key.clone(),
            format!("cannot read {}: {e}", file.display()),
        )
    })?;
    let value = text.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(err(file_key, format!("{} is empty", file.display())));
    }
    *secret = Some(value.to_string());
    Ok(())
}

/// Validates values that deserialized but are out of range or inconsistent: section by
/// section, the first error wins.
fn validate(
    config: &Config,
    err: &impl Fn(String, String) -> ConfigError,
) -> Result<(), ConfigError> {
    check_gateway(config, err)?;
    check_bind(
        "admin",
        config.admin.bind,
        config.admin.token.is_some(),
        err,
    )?;
    check_supervision(config, err)?;
    for (name, pool) in &config.start_slots {
        pool.validate()
            .map_err(|(f, m)| err(format!("start_slots.{name}.{f}"), m))?;
    }
    check_matrix(config, err)?;
    check_node(config, err)?;
    if config.inbox.retention_ms < MIN_RETENTION_MS {
        return Err(err(
            "inbox.retention_ms".to_string(),
            format!("must be at least {MIN_RETENTION_MS} (one minute)"),
        ));
    }
    positive(
        "inbox.max_messages_per_account",
        config.inbox.max_messages_per_account,
        err,
    )?;
    positive("inbox.max_consumers", config.inbox.max_consumers, err)?;
    check_approvals(config, err)?;
    positive("shutdown.deadline_ms", config.shutdown.deadline_ms, err)
}

/// `[approvals]`: the default account notifies, so it must run an approval handler; a
/// re-notification needs a moment for the account to come back.
fn check_approvals(
    config: &Config,
    err: &impl Fn(String, String) -> ConfigError,
) -> Result<(), ConfigError> {
    let a = &config.approvals;
    if a.renotify_after_ms < MIN_RENOTIFY_AFTER_MS {
        return Err(err(
            "approvals.renotify_after_ms".to_string(),
            format!("must be at least {MIN_RENOTIFY_AFTER_MS}"),
        ));
    }
    if let Some(alias) = &a.default_account {
        let runs = config
            .matrix
            .accounts
            .get(alias)
            .is_some_and(|account| account.approvals.runs_handler());
        if !runs {
            return Err(err(
                "approvals.default_account".to_string(),
                format!(
                    "{alias:?} is not an account with approvals.enabled and at least one approver"
                ),
            ));
        }
    }
    Ok(())
}

/// The longest `matrix.send_retry_within_ms`: a caller waits that long for an answer.
const MAX_SEND_RETRY_WITHIN_MS: u64 = 600_000;

/// The shortest `approvals.renotify_after_ms`.
const MIN_RENOTIFY_AFTER_MS: u64 = 100;

/// `[gateway]`: its bind, its limits, its allowed origins, one token per principal, node
/// names.
fn check_gateway(
    config: &Config,
    err: &impl Fn(String, String) -> ConfigError,
) -> Result<(), ConfigError> {
    let g = &config.gateway;
    let has_operator = g.token.is_some() || !g.operators.is_empty();
    check_bind("gateway", g.bind, has_operator, err)?;
    positive("gateway.handshake_timeout_ms", g.handshake_timeout_ms, err)?;
    positive("gateway.tick_interval_ms", g.tick_interval_ms, err)?;
    positive(
        "gateway.max_preauth_per_ip",
        u64::from(g.max_preauth_per_ip),
        err,
    )?;
    positive("gateway.max_frame_bytes", g.max_frame_bytes as u64, err)?;
    positive(
        "gateway.header_read_timeout_ms",
        g.header_read_timeout_ms,
        err,
    )?;
    positive("gateway.max_connections", u64::from(g.max_connections), err)?;
    positive("gateway.max_subscriptions", g.max_subscriptions as u64, err)?;
    positive(
        "gateway.max_invoke_timeout_ms",
        g.max_invoke_timeout_ms,
        err,
    )?;
    positive(
        "gateway.max_pending_invocations",
        g.max_pending_invocations as u64,
        err,
    )?;
    positive("gateway.node_forget_after_ms", g.node_forget_after_ms, err)?;
    check_origins(&g.allowed_origins, err)?;
    check_distinct_tokens(config, err)?;
    check_node_names(config, err)
}

/// Every `gateway.allowed_origins` entry is `scheme://host[:port]`.
fn check_origins(
    origins: &[String],
    err: &impl Fn(String, String) -> ConfigError,
) -> Result<(), ConfigError> {
    for (i, origin) in origins.iter().enumerate() {
        if !is_origin(origin) {
            let msg = format!(
                "{origin:?} is not an origin: give scheme://host[:port], e.g. \"https://ops.example.com\""
            );
            return Err(err(format!("gateway.allowed_origins[{i}]"), msg));
        }
    }
    Ok(())
}

/// Every principal needs its own token: a token shared by an operator and a node would make
/// the node host an operator.
fn check_distinct_tokens(
    config: &Config,
    err: &impl Fn(String, String) -> ConfigError,
) -> Result<(), ConfigError> {
    let g = &config.gateway;
    let mut seen: Vec<(String, &str)> = Vec::new();
    let tokens =
        g.token
            .iter()
            .map(|t| ("gateway.token".to_string(), t.as_str()))
            .chain(g.operators.iter().filter_map(|(n, c)| {
                Some((format!("gateway.operators.{n}.token"), c.token.as_deref()?))
            }))
            .chain(g.nodes.iter().filter_map(|(n, c)| {
                Some((format!("gateway.nodes.{n}.token"), c.token.as_deref()?))
            }));
    for (key, token) in tokens {
        if let Some((first, _)) = seen.iter().find(|(_, t)| *t == token) {
            let msg =
                format!("is the same token as {first}; every operator and node needs its own");
            return Err(err(key, msg));
        }
        seen.push((key, token));
    }
    Ok(())
}

/// Names of configured nodes: 1 to 128 characters, no spaces or control characters.
fn check_node_names(
    config: &Config,
    err: &impl Fn(String, String) -> ConfigError,
) -> Result<(), ConfigError> {
    for name in config.gateway.nodes.keys() {
        let bad = name.is_empty()
            || name.len() > warden_actors::gateway::protocol::handshake::MAX_NAME_LEN
            || name.chars().any(|c| c.is_control() || c.is_whitespace());
        if bad {
            let msg = "a node name is 1 to 128 characters with no spaces or control characters";
            return Err(err(format!("gateway.nodes.{name}"), msg.to_string()));
        }
    }
    Ok(())
}

/// `[matrix.accounts.*]`: homeserver URL, user IDs, a credential, room and sender filters.
fn check_matrix(
    config: &Config,
    err: &impl Fn(String, String) -> ConfigError,
) -> Result<(), ConfigError> {
    if config.matrix.send_retry_within_ms > MAX_SEND_RETRY_WITHIN_MS {
        return Err(err(
            "matrix.send_retry_within_ms".to_string(),
            format!("must be at most {MAX_SEND_RETRY_WITHIN_MS} (10 minutes)"),
        ));
    }
    for (alias, acc) in &config.matrix.accounts {
        let key = |field: &str| format!("matrix.accounts.{alias}.{field}");
        // The alias names a directory (<state.dir>/matrix/<alias>), a path in the tree and
        // a segment of the admin URLs that act on it.
        let alias_ok = (1..=64).contains(&alias.len())
            && alias
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !alias_ok {
            let msg = "an account alias is 1 to 64 of A-Z a-z 0-9 _ -".to_string();
            return Err(err(format!("matrix.accounts.{alias}"), msg));
        }
        if !(acc.homeserver.starts_with("http://") || acc.homeserver.starts_with("https://")) {
            let msg = format!("{:?} must start with http:// or https://", acc.homeserver);
            return Err(err(key("homeserver"), msg));
        }
        let full_id = |id: &str| id.starts_with('@') && id.contains(':');
        if let Some(user_id) = &acc.user_id
            && !full_id(user_id)
        {
            let msg = format!("{user_id:?} must be a full user ID like @name:server");
            return Err(err(key("user_id"), msg));
        }
        if acc.password.is_none() && acc.access_token.is_none() {
            let msg = "needs password or access_token (or password_file / access_token_file)";
            return Err(err(format!("matrix.accounts.{alias}"), msg.to_string()));
        }
        if acc.password.is_some() && acc.user_id.is_none() {
            let msg = "is required for a password login".to_string();
            return Err(err(key("user_id"), msg));
        }
        if let Some(room) = acc.allowed_rooms.iter().find(|r| !r.starts_with('!')) {
            let msg =
                format!("{room:?} is not a room ID: give IDs like \"!abc:server\", not aliases");
            return Err(err(key("allowed_rooms"), msg));
        }
        if let Some(sender) = acc
            .allowed_senders
            .iter()
            .find(|s| *s != "*" && !full_id(s))
        {
            let msg = format!("{sender:?} must be a full user ID like @name:server, or \"*\"");
            return Err(err(key("allowed_senders"), msg));
        }
    }
    Ok(())
}

/// `[node]`: the gateway URL, each command, the concurrency cap, the token.
fn check_node(
    config: &Config,
    err: &impl Fn(String, String) -> ConfigError,
) -> Result<(), ConfigError> {
    let Some(node) = &config.node else {
        return Ok(());
    };
    if !(node.gateway_url.starts_with("ws://") || node.gateway_url.starts_with("wss://")) {
        let msg = format!("{:?} must start with ws:// or wss://", node.gateway_url);
        return Err(err("node.gateway_url".to_string(), msg));
    }
    for (name, cmd) in &node.commands {
        if cmd.argv.first().is_none_or(String::is_empty) {
            let msg = "must name a program: a non-empty list of strings".to_string();
            return Err(err(format!("node.commands.{name}.argv"), msg));
        }
        positive(
            &format!("node.commands.{name}.timeout_ms"),
            cmd.timeout_ms,
            err,
        )?;
        for (key, value) in &cmd.env {
            commands::check_env(key, value)
                .map_err(|msg| err(format!("node.commands.{name}.env"), msg))?;
        }
    }
    positive(
        "node.max_concurrent_commands",
        node.max_concurrent_commands as u64,
        err,
    )?;
    if node.token.is_none() {
        let msg = "is required: the node authenticates with it and checks approval \
                   grants with it; set node.token or node.token_file"
            .to_string();
        return Err(err("node.token".to_string(), msg));
    }
    Ok(())
}

/// A non-loopback `bind` needs a token.
fn check_bind(
    section: &str,
    bind: SocketAddr,
    has_token: bool,
    err: &impl Fn(String, String) -> ConfigError,
) -> Result<(), ConfigError> {
    if bind.ip().is_loopback() || has_token {
        return Ok(());
    }
    let msg = format!(
        "{bind} is not a loopback address and no {section}.token is set; \
         set {section}.token or {section}.token_file, or bind to 127.0.0.1"
    );
    Err(err(format!("{section}.bind"), msg))
}

/// `scheme://host[:port]` with no path, as browsers send it in `Origin`.
fn is_origin(origin: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    let scheme_ok = !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    let host = rest.trim_end_matches('/');
    scheme_ok && !host.is_empty() && !host.contains(['/', '?', '#', ' ', '@'])
}

/// The shortest `inbox.retention_ms`: a message must outlive the replay that reads it.
const MIN_RETENTION_MS: u64 = 60_000;

/// `value` must be above 0.
fn positive(
    key: &str,
    value: u64,
    err: &impl Fn(String, String) -> ConfigError,
) -> Result<(), ConfigError> {
    if value == 0 {
        Err(err(key.to_string(), "must be above 0".to_string()))
    } else {
        Ok(())
    }
}

/// Validates the restart policies: each layer on its own (`supervision.defaults`,
/// `supervision.kinds.<kind>`, each Matrix account's `supervision`), then the effective
/// policy of every kind and every account, all layers applied.
fn check_supervision(
    config: &Config,
    err: &impl Fn(String, String) -> ConfigError,
) -> Result<(), ConfigError> {
    check_policy("supervision.defaults", &config.supervision.defaults, err)?;
    for (kind, layer) in &config.supervision.kinds {
        let key = format!("supervision.kinds.{kind}");
        if !KINDS.contains(&kind.as_str()) {
            let known = KINDS.join("`, `");
            return Err(err(
                key,
                format!("unknown kind `{kind}`, expected one of `{known}`"),
            ));
        }
        check_policy(&key, layer, err)?;
    }
    let accounts: Vec<(String, &PolicySettings)> = config
        .matrix
        .accounts
        .iter()
        .map(|(alias, acc)| {
            (
                format!("matrix.accounts.{alias}.supervision"),
                &acc.supervision,
            )
        })
        .collect();
    for (key, layer) in &accounts {
        check_policy(key, layer, err)?;
    }

    for kind in KINDS {
        check_effective(config, kind, None, err)?;
    }
    for (key, layer) in accounts {
        check_effective(config, matrix::KIND, Some((key, layer)), err)?;
    }
    Ok(())
}

/// Validates one policy layer found at `prefix`.
fn check_policy(
    prefix: &str,
    layer: &PolicySettings,
    err: &impl Fn(String, String) -> ConfigError,
) -> Result<(), ConfigError> {
    layer
        .validate()
        .map_err(|(field, msg)| err(format!("{prefix}.{field}"), msg))
}

/// Validates the effective policy of `kind` (under `child`, a child's own layer and its
/// key), exactly as [`Config::policy_for`] composes it. The error names the key of the
/// layer that set the offending value, so its source is that layer's: of two values that
/// disagree (`initial_ms` above `max_ms`), the one from the later layer, which overrode
/// the layer the other came from.
fn check_effective(
    config: &Config,
    kind: &str,
    child: Option<(String, &PolicySettings)>,
    err: &impl Fn(String, String) -> ConfigError,
) -> Result<(), ConfigError> {
    let policy = config.policy_for(kind, child.as_ref().map(|(_, layer)| *layer));
    let Err(problem) = validate_effective(&policy) else {
        return Ok(());
    };
    let mut layers = config.kind_layers(kind);
    layers.extend(child);
    // The index of the last layer that sets `field`; `None` for the built-in kind default.
    let origin = |field: &str| layers.iter().rposition(|(_, layer)| layer.sets(field));
    let (field, mut message, other) = match problem {
        PolicyProblem::Value((field, message)) => (field, message, None),
        PolicyProblem::InitialAboveMax { initial_ms, max_ms } => {
            let (initial, max) = ("backoff.initial_ms", "backoff.max_ms");
            if origin(max) > origin(initial) {
                let message = format!("{max_ms} is below {initial} {initial_ms}");
                (max, message, Some(initial))
            } else {
                let message = format!("{initial_ms} is above {max} {max_ms}");
                (initial, message, Some(max))
            }
        }
    };
    let Some(at) = origin(field) else {
        // The built-in policies are valid (a test checks it); this names the kind if not.
        message.push_str(" (built-in default)");
        return Err(err(format!("supervision.kinds.{kind}.{field}"), message));
    };
    let prefix = &layers[at].0;
    if let Some(other) = other
        && let Some(other_at) = origin(other)
        && other_at != at
    {
        message.push_str(&format!(", set at {}.{other}", layers[other_at].0));
    }
    if prefix == "supervision.defaults" {
        // This layer reaches every kind: say which one it breaks.
        message.push_str(&format!(" in the policy of kind `{kind}`"));
    }
    Err(err(format!("{prefix}.{field}"), message))
}
