//! The figment layers and where each value came from.
//!
//! Every layer is a [`Layer`]: a dictionary plus the one-line description of its source that
//! errors and `warden config show` print. The environment and the command line give one
//! layer per variable or flag, so the source of a value is the exact variable or flag that
//! set it, not a whole provider.

use std::path::{Path, PathBuf};

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Num, Value};
use figment::{Figment, Metadata, Profile, Provider};

use super::{ConfigError, ConfigSources};

/// The built-in defaults: `config/warden.toml`, which documents every key.
pub const DEFAULTS_TOML: &str = include_str!("../../config/warden.toml");

/// How the built-in defaults are named as a source.
pub(super) const DEFAULT_SOURCE: &str = "built-in default";

/// Prefix of configuration variables.
const ENV_PREFIX: &str = "WARDEN_";

/// Separator between keys in a variable name.
const ENV_SEPARATOR: &str = "__";

/// The variable naming the config file; not a key.
const ENV_CONFIG: &str = "WARDEN_CONFIG";

/// The file read when neither `--config` nor `WARDEN_CONFIG` is given, if it exists.
const DEFAULT_FILE: &str = "config/warden.toml";

/// Leaf keys whose values are strings: taken verbatim from the environment and flags
/// instead of parsed, so `WARDEN_GATEWAY__TOKEN=123` is the string `"123"`.
const STRING_KEYS: &[&str] = &[
    "token",
    "password",
    "access_token",
    "recovery_key",
    "device_id",
    "user_id",
    "homeserver",
    "name",
    "gateway_url",
    "bind",
    "dir",
    "log_format",
    "log_filter",
    "otlp_endpoint",
    "default_account",
];

/// One layer of configuration with a fixed source description.
struct Layer {
    /// How the source is printed: `file /etc/warden.toml`, `environment variable WARDEN_X`.
    source: String,
    /// The values this layer sets.
    dict: Dict,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.source.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// The layers built, and the file they read.
pub(super) struct Built {
    pub(super) figment: Figment,
    /// The config file read, absolute.
    pub(super) file: Option<PathBuf>,
    /// Whether the text read from it (the very text parsed) was blank.
    pub(super) blank_file: bool,
}

/// Builds the figment from defaults, the config file, `env` (name, value) pairs and
/// flags, later layers winning. The file is `pinned` when given (a reload reads the file
/// read at start-up, however it was found then), else found from `sources` and `env`.
pub(super) fn build(
    sources: &ConfigSources,
    env: &[(String, String)],
    pinned: Option<&Path>,
) -> Result<Built, ConfigError> {
    let mut figment = Figment::new().merge(toml_layer(DEFAULTS_TOML, DEFAULT_SOURCE.to_string())?);

    let file = match pinned {
        Some(path) => Some(path.to_path_buf()),
        None => config_file(sources, env)?,
    };
    let mut blank_file = false;
    if let Some(path) = &file {
        let (layer, blank) = file_layer(path, sources, env)?;
        figment = figment.merge(layer);
        blank_file = blank;
    }

    let mut vars: Vec<&(String, String)> = env.iter().collect();
    vars.sort();
    for (name, raw) in vars {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if name == ENV_CONFIG {
            continue;
        }
        let source = format!("environment variable {name}");
        let keys: Vec<String> = rest
            .split(ENV_SEPARATOR)
            .map(str::to_ascii_lowercase)
            .collect();
        figment = figment.merge(value_layer(&keys, raw, source)?);
    }

    for flag in &sources.flags {
        let keys: Vec<String> = flag.key.split('.').map(str::to_string).collect();
        let source = format!("command-line flag {}", flag.name);
        figment = figment.merge(value_layer(&keys, &flag.value, source)?);
    }
    Ok(Built {
        figment,
        file,
        blank_file,
    })
}

/// The config file to read, as an absolute path: `--config`, else `WARDEN_CONFIG`, else
/// `config/warden.toml` when it exists.
fn config_file(
    sources: &ConfigSources,
    env: &[(String, String)],
) -> Result<Option<PathBuf>, ConfigError> {
    let (path, origin) = if let Some(path) = &sources.path {
        (path.clone(), "command-line flag --config".to_string())
    } else if let Some(path) = env_config(env) {
        (
            PathBuf::from(path),
            format!("environment variable {ENV_CONFIG}"),
        )
    } else if Path::new(DEFAULT_FILE).is_file() {
        (
            PathBuf::from(DEFAULT_FILE),
            format!("default path {DEFAULT_FILE}"),
        )
    } else {
        return Ok(None);
    };
    std::path::absolute(&path)
        .map(Some)
        .map_err(|e| ConfigError {
            key: String::new(),
            source: origin,
            message: format!("config file {}: {e}", path.display()),
        })
}

/// The non-empty value of `WARDEN_CONFIG`.
fn env_config(env: &[(String, String)]) -> Option<&str> {
    env.iter()
        .find(|(k, v)| k == ENV_CONFIG && !v.is_empty())
        .map(|(_, v)| v.as_str())
}

/// Reads and parses the config file at `path`; also says whether its text was blank.
fn file_layer(
    path: &Path,
    sources: &ConfigSources,
    env: &[(String, String)],
) -> Result<(Layer, bool), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        key: String::new(),
        source: if sources.path.is_some() {
            "command-line flag --config".to_string()
        } else if env_config(env).is_some() {
            format!("environment variable {ENV_CONFIG}")
        } else {
            file_source(path)
        },
        message: format!("cannot read config file {}: {e}", path.display()),
    })?;
    Ok((
        toml_layer(&text, file_source(path))?,
        text.trim().is_empty(),
    ))
}

/// How a file is named as a source.
fn file_source(path: &Path) -> String {
    format!("file {}", path.display())
}

/// Parses TOML `text` into a layer named `source`.
fn toml_layer(text: &str, source: String) -> Result<Layer, ConfigError> {
    let parsed = Toml::string(text).data().map_err(|e| ConfigError {
        key: String::new(),
        source: source.clone(),
        message: one_line(&e.kind.to_string()),
    })?;
    let dict = parsed.into_values().next().unwrap_or_default();
    Ok(Layer { source, dict })
}

/// A layer setting the single value at `keys`, parsed from `raw`.
fn value_layer(keys: &[String], raw: &str, source: String) -> Result<Layer, ConfigError> {
    if keys.iter().any(String::is_empty) {
        return Err(ConfigError {
            key: keys.join("."),
            source,
            message: "empty key segment in the name".to_string(),
        });
    }
    let mut value = parse_value(keys.last().map_or("", String::as_str), raw);
    for key in keys.iter().skip(1).rev() {
        let mut dict = Dict::new();
        dict.insert(key.clone(), value);
        value = Value::from(dict);
    }
    let mut dict = Dict::new();
    if let Some(first) = keys.first() {
        dict.insert(first.clone(), value);
    }
    Ok(Layer { source, dict })
}

/// Parses an environment or flag value: verbatim for string keys, else as a TOML-like
/// value (`5000`, `true`, `0.5`, `["a", "b"]`); anything unparsable stays a string.
fn parse_value(leaf: &str, raw: &str) -> Value {
    if STRING_KEYS.contains(&leaf) || leaf.ends_with("_file") {
        return Value::from(raw.to_string());
    }
    let Ok(value) = raw.parse::<Value>();
    match value {
        // figment parses short decimals as f32, which widens inexactly (0.2 → 0.2000000029).
        Value::Num(_, Num::F32(_)) => raw.trim().parse::<f64>().map_or(value, Value::from),
        other => other,
    }
}

/// The source of the value at `key`, or of the nearest table above it that has one.
pub(super) fn source_of(figment: &Figment, key: &str) -> Option<String> {
    let mut key = key;
    loop {
        if let Some(md) = figment.find_metadata(key) {
            return Some(md.name.to_string());
        }
        key = key.rsplit_once('.')?.0;
    }
}

/// Squeezes a multi-line message onto one line. A TOML parse error's source snippet (the
/// `  |` and `2 | …` lines) is dropped; the rest is joined with `: ` after the first line
/// and `; ` after that.
pub(super) fn one_line(message: &str) -> String {
    let is_snippet = |l: &str| {
        let digits = l.trim_start_matches(|c: char| c.is_ascii_digit());
        l.starts_with('|') || (digits.len() < l.len() && digits.trim_start().starts_with('|'))
    };
    let mut lines = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !is_snippet(l));
    let first = lines.next().unwrap_or_default().to_string();
    let rest: Vec<&str> = lines.collect();
    if rest.is_empty() {
        first
    } else {
        format!("{first}: {}", rest.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_keys_are_verbatim_and_decimals_exact() {
        assert_eq!(parse_value("token", "123"), Value::from("123".to_string()));
        assert_eq!(
            parse_value("password", "[x]"),
            Value::from("[x]".to_string())
        );
        assert_eq!(parse_value("token_file", "1"), Value::from("1".to_string()));
        assert_eq!(parse_value("max_ms", "5000"), Value::from(5000_u16));
        assert_eq!(parse_value("jitter", "0.2"), Value::from(0.2_f64));
        assert_eq!(parse_value("max_ms", "5s"), Value::from("5s".to_string()));
    }

    #[test]
    fn multi_line_messages_keep_first_and_last_line() {
        let msg =
            "TOML parse error at line 12, column 3\n   |\n12 | a =\n   |   ^\nbad\nexpected x\n";
        assert_eq!(
            one_line(msg),
            "TOML parse error at line 12, column 3: bad; expected x"
        );
        assert_eq!(one_line("plain"), "plain");
    }
}
