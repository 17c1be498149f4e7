//! The effective configuration as flat `key = value` entries with their sources, secrets
//! masked: what `warden config show` prints and `/admin/config` serves.

use figment::value::{Dict, Num, Value};
use figment::{Figment, Profile, Provider};

/// Leaf names whose values are never shown.
const SECRET_KEYS: &[&str] = &["token", "password", "access_token", "recovery_key"];

/// What a secret is shown as.
const MASK: &str = "****";

/// One leaf of the effective configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigEntry {
    /// Dotted key, e.g. `gateway.bind`.
    pub key: String,
    /// The value as TOML (`"127.0.0.1:18789"`, `5000`, `["a"]`); secrets are `"****"`.
    pub value: String,
    /// Where it came from: `built-in default`, `file /etc/warden.toml`,
    /// `environment variable WARDEN_GATEWAY__BIND` or `command-line flag --gateway-bind`.
    pub source: String,
}

/// Every leaf of `figment`'s merged values, in key order. An empty table is one entry, `{}`.
pub(super) fn entries(figment: &Figment) -> Vec<ConfigEntry> {
    let mut out = Vec::new();
    if let Ok(mut data) = figment.data()
        && let Some(dict) = data.remove(&Profile::Default)
    {
        walk(figment, "", &dict, &mut out);
    }
    out
}

fn walk(figment: &Figment, prefix: &str, dict: &Dict, out: &mut Vec<ConfigEntry>) {
    for (name, value) in dict {
        let key = if prefix.is_empty() {
            toml_key(name)
        } else {
            format!("{prefix}.{}", toml_key(name))
        };
        match value {
            Value::Dict(_, inner) if !inner.is_empty() && !is_secret(name) => {
                walk(figment, &key, inner, out);
            }
            _ => {
                let source = figment
                    .get_metadata(value.tag())
                    .map_or_else(|| "unknown source".to_string(), |md| md.name.to_string());
                let value = if is_secret(name) {
                    toml_string(MASK)
                } else {
                    render(value)
                };
                out.push(ConfigEntry { key, value, source });
            }
        }
    }
}

fn is_secret(name: &str) -> bool {
    SECRET_KEYS.contains(&name)
}

/// `key = value   # source` lines, the comments aligned, after a header naming the file.
pub(super) fn render_lines(file: Option<&std::path::Path>, entries: &[ConfigEntry]) -> String {
    /// Comments are aligned up to this column; longer lines push theirs further right.
    const MAX_ALIGN: usize = 60;
    let mut out = match file {
        Some(path) => format!(
            "# warden effective configuration; file: {}\n",
            path.display()
        ),
        None => "# warden effective configuration; no config file\n".to_string(),
    };
    let lefts: Vec<String> = entries
        .iter()
        .map(|e| format!("{} = {}", e.key, e.value))
        .collect();
    let width = lefts
        .iter()
        .map(|l| l.chars().count())
        .filter(|&n| n <= MAX_ALIGN)
        .max();
    let width = width.unwrap_or(0);
    for (left, entry) in lefts.iter().zip(entries) {
        out.push_str(&format!("{left:<width$}   # {}\n", entry.source));
    }
    out
}

/// A value as TOML.
fn render(value: &Value) -> String {
    match value {
        Value::String(_, s) => toml_string(s),
        Value::Char(_, c) => toml_string(&c.to_string()),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(_, n) => render_num(*n),
        Value::Empty(..) => "\"\"".to_string(),
        Value::Array(_, items) => {
            let items: Vec<String> = items.iter().map(render).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Dict(_, dict) => {
            let items: Vec<String> = dict
                .iter()
                .map(|(k, v)| format!("{} = {}", toml_key(k), render(v)))
                .collect();
            if items.is_empty() {
                "{}".to_string()
            } else {
                format!("{{ {} }}", items.join(", "))
            }
        }
    }
}

fn render_num(n: Num) -> String {
    match n {
        Num::F32(f) => format!("{f:?}"),
        Num::F64(f) => format!("{f:?}"),
        Num::U8(v) => v.to_string(),
        Num::U16(v) => v.to_string(),
        Num::U32(v) => v.to_string(),
        Num::U64(v) => v.to_string(),
        Num::U128(v) => v.to_string(),
        Num::USize(v) => v.to_string(),
        Num::I8(v) => v.to_string(),
        Num::I16(v) => v.to_string(),
        Num::I32(v) => v.to_string(),
        Num::I64(v) => v.to_string(),
        Num::I128(v) => v.to_string(),
        Num::ISize(v) => v.to_string(),
    }
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A key, bare when TOML allows it, else quoted.
fn toml_key(k: &str) -> String {
    let bare = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare { k.to_string() } else { toml_string(k) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_render_as_toml() {
        assert_eq!(render(&Value::from(2.0_f64)), "2.0");
        assert_eq!(render(&Value::from(5000_u64)), "5000");
        assert_eq!(render(&Value::from("a\"b\n".to_string())), r#""a\"b\n""#);
        let arr = Value::from(vec!["x".to_string(), "y".to_string()]);
        assert_eq!(render(&arr), r#"["x", "y"]"#);
        assert_eq!(toml_key("nova"), "nova");
        assert_eq!(toml_key("a.b"), r#""a.b""#);
    }
}
