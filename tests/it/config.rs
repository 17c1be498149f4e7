//! Integration tests: config.
//!
//! Every test that loads runs inside `figment::Jail`: a temporary working directory and
//! scoped environment variables, never the real process environment.
#![expect(
    clippy::result_large_err,
    reason = "figment::Jail closures must return figment::Result, whose error is large"
)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use figment::Jail;
use figment::providers::{Format, Toml};
use warden::config::{
    Config, ConfigError, ConfigSources, DEFAULTS_TOML, EXIT_CONFIG, Flag, KINDS, Loaded, load,
};
use warden_actors::supervision::{Action, PoolSettings};

use crate::support::Launch;

type JailResult<T> = Result<T, figment::Error>;

/// Loads with `sources`, turning a config error into a Jail failure.
fn load_ok(sources: &ConfigSources) -> JailResult<Loaded> {
    load(sources).map_err(|e| figment::Error::from(e.to_string()))
}

/// Loads with `sources`, expecting a config error; returns it.
fn load_err(sources: &ConfigSources) -> JailResult<ConfigError> {
    match load(sources) {
        Ok(loaded) => Err(format!("expected an error, loaded {:?}", loaded.config).into()),
        Err(e) => {
            assert!(!e.to_string().contains('\n'), "not one line: {e}");
            Ok(e)
        }
    }
}

/// Loads with no file and no flags, expecting the error displayed as `expected`.
fn expect_error(expected: &str) -> JailResult<()> {
    let err = load_err(&ConfigSources::default())?;
    assert_eq!(err.to_string(), expected);
    Ok(())
}

/// `--config warden.toml`.
fn with_file() -> ConfigSources {
    ConfigSources {
        path: Some(PathBuf::from("warden.toml")),
        flags: Vec::new(),
    }
}

/// The absolute path of `name` in the jail, as sources print it.
fn abs(name: &str) -> JailResult<String> {
    let cwd = std::env::current_dir().map_err(|e| e.to_string())?;
    Ok(cwd.join(name).display().to_string())
}

/// Key → (value, source) of the loaded entries.
fn entry_map(loaded: &Loaded) -> BTreeMap<String, (String, String)> {
    loaded
        .entries()
        .into_iter()
        .map(|e| (e.key, (e.value, e.source)))
        .collect()
}

/// The (value, source) of `key`.
fn entry(loaded: &Loaded, key: &str) -> (String, String) {
    entry_map(loaded)
        .remove(key)
        .unwrap_or_else(|| panic!("no entry {key}"))
}

fn pair(value: &str, source: &str) -> (String, String) {
    (value.to_string(), source.to_string())
}

// ---- defaults and layering ----

#[test]
fn embedded_defaults_equal_config_default() {
    let parsed: Config = figment::Figment::from(Toml::string(DEFAULTS_TOML))
        .extract()
        .expect("config/warden.toml deserializes");
    assert_eq!(parsed, Config::default());
}

#[test]
fn without_file_or_env_everything_is_a_built_in_default() {
    Jail::expect_with(|_jail| {
        let loaded = load_ok(&ConfigSources::default())?;
        assert_eq!(loaded.config, Config::default());
        assert_eq!(loaded.file(), None);
        let entries = loaded.entries();
        assert!(
            entries.iter().all(|e| e.source == "built-in default"),
            "{entries:?}"
        );
        assert_eq!(
            entry(&loaded, "gateway.bind"),
            pair("\"127.0.0.1:18789\"", "built-in default")
        );
        assert_eq!(entry(&loaded, "start_slots.approvals.jitter_ms").0, "2000");
        assert_eq!(entry(&loaded, "matrix.accounts").0, "{}");
        Ok(())
    });
}

#[test]
fn each_layer_wins_over_the_one_before() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "warden.toml",
            "[gateway]\nhandshake_timeout_ms = 2000\ntick_interval_ms = 1000\n\
             max_preauth_per_ip = 8\n",
        )?;
        jail.set_env("WARDEN_GATEWAY__TICK_INTERVAL_MS", "500");
        jail.set_env("WARDEN_GATEWAY__MAX_PREAUTH_PER_IP", "4");
        let sources = ConfigSources {
            path: Some(PathBuf::from("warden.toml")),
            flags: vec![Flag {
                key: "gateway.max_preauth_per_ip",
                value: "2".to_string(),
                name: "--gateway-max-preauth-per-ip",
            }],
        };
        let loaded = load_ok(&sources)?;
        let g = &loaded.config.gateway;
        assert_eq!(
            (
                g.max_frame_bytes,
                g.handshake_timeout_ms,
                g.tick_interval_ms,
                g.max_preauth_per_ip
            ),
            (1 << 20, 2000, 500, 2)
        );
        let file = format!("file {}", abs("warden.toml")?);
        assert_eq!(
            entry(&loaded, "gateway.max_frame_bytes"),
            pair("1048576", "built-in default")
        );
        assert_eq!(
            entry(&loaded, "gateway.handshake_timeout_ms"),
            pair("2000", &file)
        );
        assert_eq!(
            entry(&loaded, "gateway.tick_interval_ms"),
            pair(
                "500",
                "environment variable WARDEN_GATEWAY__TICK_INTERVAL_MS"
            )
        );
        assert_eq!(
            entry(&loaded, "gateway.max_preauth_per_ip"),
            pair("2", "command-line flag --gateway-max-preauth-per-ip")
        );
        Ok(())
    });
}

#[test]
fn file_comes_from_flag_then_warden_config_then_default_path() {
    Jail::expect_with(|jail| {
        jail.create_dir("config")?;
        jail.create_file("config/warden.toml", "[shutdown]\ndeadline_ms = 1\n")?;
        jail.create_file("env.toml", "[shutdown]\ndeadline_ms = 2\n")?;
        jail.create_file("flag.toml", "[shutdown]\ndeadline_ms = 3\n")?;

        let loaded = load_ok(&ConfigSources::default())?;
        assert_eq!(loaded.config.shutdown.deadline_ms, 1);
        assert_eq!(
            loaded.file(),
            Some(PathBuf::from(abs("config/warden.toml")?).as_path())
        );

        jail.set_env("WARDEN_CONFIG", "env.toml");
        let loaded = load_ok(&ConfigSources::default())?;
        assert_eq!(loaded.config.shutdown.deadline_ms, 2);
        let file = format!("file {}", abs("env.toml")?);
        assert_eq!(entry(&loaded, "shutdown.deadline_ms"), pair("2", &file));

        let sources = ConfigSources {
            path: Some(PathBuf::from("flag.toml")),
            flags: Vec::new(),
        };
        assert_eq!(load_ok(&sources)?.config.shutdown.deadline_ms, 3);
        Ok(())
    });
}

#[test]
fn a_missing_config_file_is_an_error() {
    Jail::expect_with(|jail| {
        let sources = ConfigSources {
            path: Some(PathBuf::from("nope.toml")),
            flags: Vec::new(),
        };
        let err = load_err(&sources)?;
        assert_eq!(
            err.to_string(),
            format!(
                "invalid config: cannot read config file {}: No such file or directory \
                 (os error 2) (from command-line flag --config)",
                abs("nope.toml")?
            )
        );
        assert_eq!(err.exit_code(), EXIT_CONFIG);
        assert_eq!(EXIT_CONFIG, 64);

        jail.set_env("WARDEN_CONFIG", "gone.toml");
        let err = load_err(&ConfigSources::default())?;
        assert_eq!(err.source, "environment variable WARDEN_CONFIG");
        Ok(())
    });
}

// ---- restart policies and pools ----

#[test]
fn built_in_kind_policies() {
    let c = Config::default();
    let ms = Duration::from_millis;

    let p = c.policy_for("matrix_account", None);
    assert_eq!(
        (p.backoff.initial, p.backoff.max, p.backoff.reset_after),
        (ms(1000), ms(60_000), ms(60_000))
    );
    assert_eq!((p.backoff.multiplier, p.backoff.jitter), (2.0, 0.2));
    assert_eq!(
        (p.max_restarts, p.on_exhausted, p.on_fatal),
        (0, Action::Park, Action::Park)
    );
    assert_eq!(p.liveness_timeout, Some(ms(120_000)));

    let p = c.policy_for("approval_handler", None);
    assert_eq!(
        (
            p.backoff.initial,
            p.backoff.max,
            p.max_restarts,
            p.warn_after
        ),
        (ms(1000), ms(60_000), 0, 5)
    );
    assert_eq!((p.on_exhausted, p.on_fatal), (Action::Park, Action::Park));

    for kind in ["gateway_listener", "admin"] {
        let p = c.policy_for(kind, None);
        assert_eq!(
            (p.backoff.initial, p.backoff.max),
            (ms(200), ms(5000)),
            "{kind}"
        );
        assert_eq!((p.max_restarts, p.window), (5, ms(60_000)), "{kind}");
        assert_eq!(
            (p.on_exhausted, p.on_fatal),
            (Action::Exit, Action::Exit),
            "{kind}"
        );
    }

    let p = c.policy_for("node_connection", None);
    assert_eq!(
        (p.backoff.initial, p.backoff.max, p.backoff.reset_after),
        (ms(500), ms(30_000), ms(30_000))
    );
    assert_eq!((p.max_restarts, p.on_fatal), (0, Action::Exit));

    assert_eq!(
        c.policy_for("something_else", None),
        warden_actors::supervision::Policy::default()
    );
    assert!(KINDS.contains(&"start_slots") && KINDS.len() == 9);
}

#[test]
fn policies_compose_defaults_then_kind_then_child() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "warden.toml",
            r#"
            [supervision.defaults]
            max_restarts = 7
            [supervision.kinds.matrix_account]
            backoff = { initial_ms = 2000 }
            on_fatal = "exit"
            [matrix.accounts.nova]
            homeserver = "http://localhost:8008"
            user_id = "@nova:localhost"
            password = "pw"
            supervision = { max_restarts = 3, liveness_timeout_ms = 0 }
            "#,
        )?;
        jail.set_env("WARDEN_SUPERVISION__DEFAULTS__BACKOFF__MAX_MS", "5000");
        let c = load_ok(&with_file())?.config;
        let ms = Duration::from_millis;

        // gateway_listener: built-in initial, defaults' max and max_restarts.
        let p = c.policy_for("gateway_listener", None);
        assert_eq!(
            (p.backoff.initial, p.backoff.max, p.max_restarts),
            (ms(200), ms(5000), 7)
        );
        assert_eq!(p.on_fatal, Action::Exit);

        // matrix_account: the kind layer over the defaults over the built-in.
        let p = c.policy_for("matrix_account", None);
        assert_eq!(
            (p.backoff.initial, p.backoff.max, p.max_restarts),
            (ms(2000), ms(5000), 7)
        );
        assert_eq!(
            (p.on_fatal, p.liveness_timeout),
            (Action::Exit, Some(ms(120_000)))
        );

        // The account's own layer on top.
        let nova = &c.matrix.accounts["nova"];
        let p = c.policy_for("matrix_account", Some(&nova.supervision));
        assert_eq!(
            (p.backoff.initial, p.max_restarts, p.liveness_timeout),
            (ms(2000), 3, None)
        );
        assert_eq!(p.on_fatal, Action::Exit);
        Ok(())
    });
}

// ---- effective restart policies: every layer applied ----

/// Environment variables a case sets: (name, value).
type Envs = &'static [(&'static str, &'static str)];

/// Loads `file` (if any) with `envs` set, expecting a policy error; returns its display.
fn policy_error(file: Option<&str>, envs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    Jail::expect_with(|jail| {
        let sources = match file {
            Some(text) => {
                jail.create_file("warden.toml", text)?;
                with_file()
            }
            None => ConfigSources::default(),
        };
        for (name, value) in envs {
            jail.set_env(name, value);
        }
        let err = load_err(&sources)?;
        assert_eq!(err.exit_code(), EXIT_CONFIG);
        let shown = err.to_string();
        out = shown.replace(&abs("warden.toml")?, "warden.toml");
        Ok(())
    });
    out
}

#[test]
fn an_initial_delay_above_the_built_in_cap_names_the_variable() {
    // The brief's example: node_connection's built-in max_ms is 30000.
    let var = "WARDEN_SUPERVISION__KINDS__NODE_CONNECTION__BACKOFF__INITIAL_MS";
    assert_eq!(
        policy_error(None, &[(var, "90000")]),
        format!(
            "invalid config: supervision.kinds.node_connection.backoff.initial_ms: 90000 is \
             above backoff.max_ms 30000 (from environment variable {var})"
        )
    );
}

#[test]
fn effective_policies_blame_the_layer_that_set_the_value() {
    const NOVA_TOKEN: &str = "[matrix.accounts.nova]\nhomeserver = \"http://h\"\n\
                              access_token = \"t\"\n";
    let cases: &[(&str, Envs, &str)] = &[
        // `supervision.defaults` reaches every kind: gateway_listener's built-in cap is 5 s.
        (
            "[supervision.defaults]\nbackoff = { initial_ms = 10000 }\n",
            &[],
            "supervision.defaults.backoff.initial_ms: 10000 is above backoff.max_ms 5000 in \
             the policy of kind `gateway_listener` (from file warden.toml)",
        ),
        // A cap below a built-in first delay: the cap is to blame.
        (
            "[supervision.kinds.matrix_account]\nbackoff = { max_ms = 500 }\n",
            &[],
            "supervision.kinds.matrix_account.backoff.max_ms: 500 is below \
             backoff.initial_ms 1000 (from file warden.toml)",
        ),
        // Two configured layers disagree: the later one is named, and the other's key too.
        (
            "[supervision.defaults]\nbackoff = { max_ms = 20000 }\n",
            &[(
                "WARDEN_SUPERVISION__KINDS__MATRIX_ACCOUNT__BACKOFF__INITIAL_MS",
                "25000",
            )],
            "supervision.kinds.matrix_account.backoff.initial_ms: 25000 is above \
             backoff.max_ms 20000, set at supervision.defaults.backoff.max_ms (from \
             environment variable WARDEN_SUPERVISION__KINDS__MATRIX_ACCOUNT__BACKOFF__INITIAL_MS)",
        ),
        // A Matrix account's own layer over matrix_account's.
        (
            &format!("{NOVA_TOKEN}supervision = {{ backoff = {{ initial_ms = 70000 }} }}\n"),
            &[],
            "matrix.accounts.nova.supervision.backoff.initial_ms: 70000 is above \
             backoff.max_ms 60000 (from file warden.toml)",
        ),
        // The attack: a zero cap from supervision.defaults, on a node host.
        (
            "[node]\ngateway_url = \"ws://127.0.0.1:1/ws\"\ntoken = \"t\"\n\
             [supervision.defaults]\nbackoff = { max_ms = 0 }\n",
            &[],
            "supervision.defaults.backoff.max_ms: must be above 0 (from file warden.toml)",
        ),
        (
            "[supervision.kinds.admin]\nbackoff = { initial_ms = 0 }\n",
            &[],
            "supervision.kinds.admin.backoff.initial_ms: must be above 0 (from file \
             warden.toml)",
        ),
        (
            "[supervision.defaults]\nbackoff = { multiplier = 0.5 }\n",
            &[],
            "supervision.defaults.backoff.multiplier: 0.5 must be a number ≥ 1 (from file \
             warden.toml)",
        ),
        (
            "[supervision.defaults]\nbackoff = { multiplier = inf }\n",
            &[],
            "supervision.defaults.backoff.multiplier: inf must be a number ≥ 1 (from file \
             warden.toml)",
        ),
        (
            "[supervision.kinds.start_slots]\nbackoff = { jitter = nan }\n",
            &[],
            "supervision.kinds.start_slots.backoff.jitter: NaN must be between 0 and 1 \
             (from file warden.toml)",
        ),
        (
            "[supervision.defaults]\nbackoff = { jitter = -0.1 }\n",
            &[],
            "supervision.defaults.backoff.jitter: -0.1 must be between 0 and 1 (from file \
             warden.toml)",
        ),
        (
            "",
            &[(
                "WARDEN_SUPERVISION__KINDS__GATEWAY_LISTENER__WINDOW_MS",
                "0",
            )],
            "supervision.kinds.gateway_listener.window_ms: must be above 0 (from \
             environment variable WARDEN_SUPERVISION__KINDS__GATEWAY_LISTENER__WINDOW_MS)",
        ),
        (
            &format!("{NOVA_TOKEN}supervision = {{ shutdown_timeout_ms = 0 }}\n"),
            &[],
            "matrix.accounts.nova.supervision.shutdown_timeout_ms: must be above 0 (from \
             file warden.toml)",
        ),
    ];
    for (file, envs, expected) in cases {
        assert_eq!(
            policy_error(Some(file), envs),
            format!("invalid config: {expected}"),
            "file:\n{file}"
        );
    }
}

#[test]
fn layers_that_only_agree_together_are_valid() {
    Jail::expect_with(|jail| {
        // A long first delay for everyone, with room for it where the built-in cap is 5 s;
        // and an account whose own cap is below matrix_account's first delay, but which
        // lowers that delay too.
        jail.create_file(
            "warden.toml",
            r#"
            [supervision.defaults]
            backoff = { initial_ms = 10000 }
            [supervision.kinds.gateway_listener]
            backoff = { max_ms = 20000 }
            [supervision.kinds.admin]
            backoff = { max_ms = 20000 }
            [matrix.accounts.nova]
            homeserver = "http://h"
            access_token = "t"
            supervision = { backoff = { initial_ms = 100, max_ms = 400 } }
            "#,
        )?;
        let c = load_ok(&with_file())?.config;
        let p = c.policy_for("gateway_listener", None);
        assert_eq!(
            (p.backoff.initial, p.backoff.max),
            (Duration::from_secs(10), Duration::from_secs(20))
        );
        let nova = c.policy_for(
            "matrix_account",
            Some(&c.matrix.accounts["nova"].supervision),
        );
        assert_eq!(nova.backoff.max, Duration::from_millis(400));
        Ok(())
    });
}

/// Runs `warden config check` as a real process in a fresh directory holding `file` as
/// `warden.toml` (when given), with `envs`; returns (exit code, stdout, stderr).
fn config_check(name: &str, file: Option<&str>, envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut launch = Launch::new(name, &["config", "check"]).envs(envs);
    if let Some(text) = file {
        launch = launch.config(text);
    }
    let out = launch
        .command()
        .as_std_mut()
        .output()
        .expect("run warden config check");
    let dir = launch.dir().display().to_string();
    let text = |b: &[u8]| String::from_utf8_lossy(b).replace(&dir, "DIR");
    (
        out.status.code().expect("exited, not signalled"),
        text(&out.stdout),
        text(&out.stderr),
    )
}

#[test]
fn config_check_process_rejects_each_class_of_bad_policy_with_64() {
    const VAR: &str = "WARDEN_SUPERVISION__KINDS__NODE_CONNECTION__BACKOFF__INITIAL_MS";
    let cases: &[(&str, Option<&str>, Envs, String)] = &[
        // The attack: `max_ms = 0` in supervision.defaults reaching node_connection.
        (
            "zero",
            Some(
                "[node]\ngateway_url = \"ws://127.0.0.1:18789/ws\"\ntoken = \"t\"\n\
                 [supervision.defaults]\nbackoff = { max_ms = 0 }\n",
            ),
            &[],
            "supervision.defaults.backoff.max_ms: must be above 0 (from file \
             DIR/warden.toml)"
                .to_string(),
        ),
        // Layers that disagree.
        (
            "order",
            None,
            &[(VAR, "90000")],
            format!(
                "supervision.kinds.node_connection.backoff.initial_ms: 90000 is above \
                 backoff.max_ms 30000 (from environment variable {VAR})"
            ),
        ),
        // Out of range, and not a finite number.
        (
            "range",
            Some("[supervision.kinds.node_connection]\nbackoff = { jitter = 2.0 }\n"),
            &[],
            "supervision.kinds.node_connection.backoff.jitter: 2 must be between 0 and 1 \
             (from file DIR/warden.toml)"
                .to_string(),
        ),
        (
            "finite",
            Some("[supervision.defaults]\nbackoff = { multiplier = nan }\n"),
            &[],
            "supervision.defaults.backoff.multiplier: NaN must be a number ≥ 1 (from file \
             DIR/warden.toml)"
                .to_string(),
        ),
        (
            "window",
            None,
            &[("WARDEN_SUPERVISION__DEFAULTS__WINDOW_MS", "0")],
            "supervision.defaults.window_ms: must be above 0 (from environment variable \
             WARDEN_SUPERVISION__DEFAULTS__WINDOW_MS)"
                .to_string(),
        ),
        // A start-slot pool.
        (
            "pool",
            None,
            &[("WARDEN_START_SLOTS__MATRIX_LOGIN__HOLD_TIMEOUT_MS", "0")],
            "start_slots.matrix_login.hold_timeout_ms: must be above 0 (from environment \
             variable WARDEN_START_SLOTS__MATRIX_LOGIN__HOLD_TIMEOUT_MS)"
                .to_string(),
        ),
    ];
    for (name, file, envs, expected) in cases {
        let (code, stdout, stderr) = config_check(&format!("check-{name}"), *file, envs);
        assert_eq!(
            (code, stdout.as_str(), stderr.as_str()),
            (
                64,
                "",
                format!("warden: invalid config: {expected}\n").as_str()
            ),
            "case {name}"
        );
    }
}

#[test]
fn config_check_process_accepts_a_valid_policy_and_wss() {
    let file = r#"
[node]
gateway_url = "wss://gateway.example.com/ws"
token = "t"
[supervision.defaults]
backoff = { initial_ms = 100, max_ms = 5000, multiplier = 1.5, jitter = 0 }
[supervision.kinds.node_connection]
backoff = { max_ms = 10000 }
window_ms = 1000
shutdown_timeout_ms = 1
"#;
    let (code, stdout, stderr) = config_check("check-valid", Some(file), &[]);
    assert_eq!(
        (code, stdout.as_str(), stderr.as_str()),
        (
            0,
            "config ok: DIR/warden.toml (with defaults and environment)\n",
            ""
        )
    );
}

#[test]
fn pools_come_from_start_slots() {
    Jail::expect_with(|jail| {
        jail.set_env("WARDEN_START_SLOTS__APPROVALS__MAX_CONCURRENT", "5");
        let pools = load_ok(&ConfigSources::default())?.config.pools();
        let ms = Duration::from_millis;
        assert_eq!(
            pools,
            vec![
                (
                    "approvals".to_string(),
                    PoolSettings {
                        max_concurrent: 5,
                        jitter: ms(2000),
                        hold_timeout: ms(30_000)
                    }
                ),
                (
                    "matrix_login".to_string(),
                    PoolSettings {
                        max_concurrent: 2,
                        jitter: ms(0),
                        hold_timeout: ms(30_000)
                    }
                ),
            ]
        );
        Ok(())
    });
}

// ---- secrets ----

const NOVA: &str = r#"
[matrix.accounts.nova]
homeserver = "http://localhost:8008"
user_id = "@nova:localhost"
"#;

#[test]
fn secrets_come_from_files_with_the_newline_trimmed() {
    Jail::expect_with(|jail| {
        jail.create_dir("secrets")?;
        jail.create_file("secrets/pw", "hunter2\n")?;
        jail.create_file("secrets/gw", "gw-token\r\n")?;
        jail.create_file(
            "warden.toml",
            &format!(
                "{NOVA}password_file = \"secrets/pw\"\n[gateway]\ntoken_file = \"secrets/gw\"\n"
            ),
        )?;
        let loaded = load_ok(&with_file())?;
        assert_eq!(
            loaded.config.matrix.accounts["nova"].password.as_deref(),
            Some("hunter2")
        );
        assert_eq!(loaded.config.gateway.token.as_deref(), Some("gw-token"));
        let file = format!("file {}", abs("warden.toml")?);
        assert_eq!(
            entry(&loaded, "matrix.accounts.nova.password_file"),
            pair("\"secrets/pw\"", &file)
        );
        let shown = loaded.render_show();
        assert!(
            !shown.contains("hunter2") && !shown.contains("gw-token"),
            "{shown}"
        );
        Ok(())
    });
}

#[test]
fn a_secret_and_its_file_together_are_an_error() {
    Jail::expect_with(|jail| {
        jail.create_file("warden.toml", "[admin]\ntoken = \"t\"\n")?;
        jail.set_env("WARDEN_ADMIN__TOKEN_FILE", "/run/secrets/admin");
        let err = load_err(&with_file())?;
        assert_eq!(
            err.to_string(),
            "invalid config: admin.token_file: admin.token is also set; give one of the two \
             (from environment variable WARDEN_ADMIN__TOKEN_FILE)"
        );
        Ok(())
    });
}

#[test]
fn an_unreadable_secret_file_names_the_key() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "warden.toml",
            &format!("{NOVA}password_file = \"missing\"\n"),
        )?;
        let err = load_err(&with_file())?;
        assert_eq!(
            err.to_string(),
            format!(
                "invalid config: matrix.accounts.nova.password_file: cannot read missing: \
                 No such file or directory (os error 2) (from file {})",
                abs("warden.toml")?
            )
        );
        Ok(())
    });
}

#[test]
fn secrets_are_masked_and_string_secrets_need_no_quotes() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "warden.toml",
            &format!("{NOVA}password = \"s3cret\"\nrecovery_key = \"EsTr ecov\"\n[admin]\ntoken = \"adm\"\n"),
        )?;
        jail.set_env("WARDEN_GATEWAY__TOKEN", "123");
        jail.set_env("WARDEN_MATRIX__ACCOUNTS__NOVA__ACCESS_TOKEN", "[syt]");
        let loaded = load_ok(&with_file())?;
        assert_eq!(loaded.config.gateway.token.as_deref(), Some("123"));
        let nova = &loaded.config.matrix.accounts["nova"];
        assert_eq!(nova.access_token.as_deref(), Some("[syt]"));
        assert!(!format!("{nova:?}").contains("s3cret"));

        let masked = "\"****\"".to_string();
        assert_eq!(
            entry(&loaded, "gateway.token"),
            (
                masked.clone(),
                "environment variable WARDEN_GATEWAY__TOKEN".to_string()
            )
        );
        for key in [
            "admin.token",
            "matrix.accounts.nova.password",
            "matrix.accounts.nova.recovery_key",
        ] {
            assert_eq!(entry(&loaded, key).0, masked, "{key}");
        }
        let shown = loaded.render_show();
        for secret in ["123", "s3cret", "EsTr", "adm\"", "syt"] {
            assert!(!shown.contains(secret), "{secret} in\n{shown}");
        }
        Ok(())
    });
}

// ---- `config show` ----

#[test]
fn render_show_prints_every_key_with_its_source() {
    Jail::expect_with(|jail| {
        jail.create_file("warden.toml", "[telemetry]\nlog_format = \"json\"\n")?;
        jail.set_env("WARDEN_STATE__DIR", "/var/lib/warden");
        let loaded = load_ok(&with_file())?;
        let shown = loaded.render_show();
        let line = |key: &str| {
            shown
                .lines()
                .find(|l| l.starts_with(&format!("{key} = ")))
                .unwrap_or_else(|| panic!("no {key} in\n{shown}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            shown.lines().next(),
            Some(
                format!(
                    "# warden effective configuration; file: {}",
                    abs("warden.toml")?
                )
                .as_str()
            )
        );
        assert_eq!(
            line("telemetry.log_format"),
            format!(
                "telemetry.log_format = \"json\" # file {}",
                abs("warden.toml")?
            )
        );
        assert_eq!(
            line("state.dir"),
            "state.dir = \"/var/lib/warden\" # environment variable WARDEN_STATE__DIR"
        );
        assert_eq!(
            line("shutdown.deadline_ms"),
            "shutdown.deadline_ms = 10000 # built-in default"
        );
        assert_eq!(shown.lines().count(), loaded.entries().len() + 1);
        Ok(())
    });
}

// ---- bad input: one line naming the key and its source ----

#[test]
fn wrong_type_in_env() {
    Jail::expect_with(|jail| {
        jail.set_env("WARDEN_SUPERVISION__DEFAULTS__BACKOFF__MAX_MS", "5s");
        expect_error(
            "invalid config: supervision.defaults.backoff.max_ms: invalid type: found string \
             \"5s\", expected u64 (from environment variable \
             WARDEN_SUPERVISION__DEFAULTS__BACKOFF__MAX_MS)",
        )
    });
}

#[test]
fn duration_string_for_a_number_in_the_file() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "warden.toml",
            "[gateway]\nhandshake_timeout_ms = \"100ms\"\n",
        )?;
        let err = load_err(&with_file())?;
        assert_eq!(
            err.to_string(),
            format!(
                "invalid config: gateway.handshake_timeout_ms: invalid type: found string \
                 \"100ms\", expected u64 (from file {})",
                abs("warden.toml")?
            )
        );
        assert_eq!(err.key, "gateway.handshake_timeout_ms");
        Ok(())
    });
}

#[test]
fn negative_number() {
    Jail::expect_with(|jail| {
        jail.create_file("warden.toml", "[shutdown]\ndeadline_ms = -5\n")?;
        let err = load_err(&with_file())?;
        assert_eq!(
            err.to_string(),
            format!(
                "invalid config: shutdown.deadline_ms: invalid value: found signed int `-5`, \
                 expected u64 (from file {})",
                abs("warden.toml")?
            )
        );
        Ok(())
    });
}

#[test]
fn jitter_out_of_range() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "warden.toml",
            "[supervision.kinds.matrix_account]\nbackoff = { jitter = 1.5 }\n",
        )?;
        let err = load_err(&with_file())?;
        assert_eq!(
            err.to_string(),
            format!(
                "invalid config: supervision.kinds.matrix_account.backoff.jitter: 1.5 must be \
                 between 0 and 1 (from file {})",
                abs("warden.toml")?
            )
        );
        Ok(())
    });
}

#[test]
fn unknown_key_in_the_file() {
    Jail::expect_with(|jail| {
        jail.create_file("warden.toml", "[gateway]\nbnd = \"127.0.0.1:1\"\n")?;
        let err = load_err(&with_file())?;
        // The list of expected keys follows `GatewaySettings`; pin its start and its end.
        let shown = err.to_string();
        assert!(
            shown.starts_with(
                "invalid config: gateway.bnd: unknown key `bnd`, expected one of `bind`, \
                 `token`, `token_file`, "
            ),
            "{shown}"
        );
        assert!(
            shown.ends_with(&format!(
                ", `expected_back_ms` (from file {})",
                abs("warden.toml")?
            )),
            "{shown}"
        );
        Ok(())
    });
}

#[test]
fn unknown_key_in_env() {
    Jail::expect_with(|jail| {
        jail.set_env("WARDEN_SHUTDOWN__DEADLINE", "5");
        expect_error(
            "invalid config: shutdown.deadline: unknown key `deadline`, expected one of \
             `deadline_ms` (from environment variable WARDEN_SHUTDOWN__DEADLINE)",
        )
    });
}

#[test]
fn unknown_top_level_key_in_env() {
    Jail::expect_with(|jail| {
        jail.set_env("WARDEN_GATEWAY_BIND", "0.0.0.0:1");
        let err = load_err(&ConfigSources::default())?;
        assert_eq!(err.key, "gateway_bind");
        assert_eq!(err.source, "environment variable WARDEN_GATEWAY_BIND");
        Ok(())
    });
}

#[test]
fn unknown_enum_value() {
    Jail::expect_with(|jail| {
        jail.set_env("WARDEN_TELEMETRY__LOG_FORMAT", "xml");
        expect_error(
            "invalid config: telemetry.log_format: unknown value `xml`, expected one of \
             `pretty`, `json` (from environment variable WARDEN_TELEMETRY__LOG_FORMAT)",
        )
    });
}

#[test]
fn an_empty_secret_is_an_error() {
    Jail::expect_with(|jail| {
        jail.set_env("WARDEN_GATEWAY__TOKEN", "");
        jail.set_env("WARDEN_GATEWAY__BIND", "0.0.0.0:18789");
        expect_error(
            "invalid config: gateway.token: is empty; give a value or leave it unset \
             (from environment variable WARDEN_GATEWAY__TOKEN)",
        )
    });
}

#[test]
fn non_loopback_admin_bind_needs_a_token() {
    Jail::expect_with(|jail| {
        jail.set_env("WARDEN_ADMIN__BIND", "0.0.0.0:18790");
        expect_error(
            "invalid config: admin.bind: 0.0.0.0:18790 is not a loopback address and no \
             admin.token is set; set admin.token or admin.token_file, or bind to 127.0.0.1 \
             (from environment variable WARDEN_ADMIN__BIND)",
        )?;
        jail.set_env("WARDEN_ADMIN__TOKEN", "t0ken");
        assert_eq!(
            load_ok(&ConfigSources::default())?
                .config
                .admin
                .token
                .as_deref(),
            Some("t0ken")
        );
        Ok(())
    });
}

#[test]
fn non_loopback_gateway_bind_from_a_flag_needs_a_token() {
    Jail::expect_with(|_jail| {
        let flag = |value: &str| Flag {
            key: "gateway.bind",
            value: value.to_string(),
            name: "--gateway-bind",
        };
        let sources = ConfigSources {
            path: None,
            flags: vec![flag("10.0.0.1:18789")],
        };
        let err = load_err(&sources)?;
        assert_eq!(
            (err.key.as_str(), err.source.as_str()),
            ("gateway.bind", "command-line flag --gateway-bind")
        );

        let sources = ConfigSources {
            path: None,
            flags: vec![flag("localhost")],
        };
        assert_eq!(
            load_err(&sources)?.to_string(),
            "invalid config: gateway.bind: invalid socket address syntax \
             (from command-line flag --gateway-bind)"
        );
        Ok(())
    });
}

#[test]
fn toml_syntax_error_is_one_line() {
    Jail::expect_with(|jail| {
        jail.create_file("warden.toml", "[gateway]\nbind = \n")?;
        let err = load_err(&with_file())?;
        assert_eq!(err.key, "");
        assert_eq!(
            err.to_string(),
            format!(
                "invalid config: TOML parse error at line 2, column 8: invalid string; \
                 expected `\"`, `'` (from file {})",
                abs("warden.toml")?
            )
        );
        Ok(())
    });
}

#[test]
fn zero_intervals_are_rejected() {
    Jail::expect_with(|jail| {
        jail.set_env("WARDEN_GATEWAY__TICK_INTERVAL_MS", "0");
        expect_error(
            "invalid config: gateway.tick_interval_ms: must be above 0 \
             (from environment variable WARDEN_GATEWAY__TICK_INTERVAL_MS)",
        )
    });
}

#[test]
fn unknown_supervision_kind() {
    Jail::expect_with(|jail| {
        jail.set_env(
            "WARDEN_SUPERVISION__KINDS__MATRIX_ACOUNT__MAX_RESTARTS",
            "3",
        );
        expect_error(
            "invalid config: supervision.kinds.matrix_acount: unknown kind `matrix_acount`, \
             expected one of `matrix_account`, `approval_handler`, `gateway_listener`, \
             `node_connection`, `admin`, `start_slots`, `supervisor`, `approvals_broker`, \
             `gateway_session` (from environment variable \
             WARDEN_SUPERVISION__KINDS__MATRIX_ACOUNT__MAX_RESTARTS)",
        )
    });
}

#[test]
fn bad_pool() {
    Jail::expect_with(|jail| {
        jail.set_env("WARDEN_START_SLOTS__APPROVALS__MAX_CONCURRENT", "0");
        expect_error(
            "invalid config: start_slots.approvals.max_concurrent: must be at least 1 \
             (from environment variable WARDEN_START_SLOTS__APPROVALS__MAX_CONCURRENT)",
        )
    });
}

#[test]
fn matrix_accounts_are_validated() {
    Jail::expect_with(|jail| {
        jail.create_file("warden.toml", NOVA)?;
        let file = abs("warden.toml")?;
        let err = load_err(&with_file())?;
        assert_eq!(
            err.to_string(),
            format!(
                "invalid config: matrix.accounts.nova: needs password or access_token \
                 (or password_file / access_token_file) (from file {file})"
            )
        );

        jail.set_env("WARDEN_MATRIX__ACCOUNTS__NOVA__PASSWORD", "pw");
        jail.set_env(
            "WARDEN_MATRIX__ACCOUNTS__NOVA__HOMESERVER",
            "localhost:8008",
        );
        assert_eq!(
            load_err(&with_file())?.to_string(),
            "invalid config: matrix.accounts.nova.homeserver: \"localhost:8008\" must start \
             with http:// or https:// (from environment variable \
             WARDEN_MATRIX__ACCOUNTS__NOVA__HOMESERVER)"
        );

        jail.create_file(
            "warden.toml",
            "[matrix.accounts.nova]\nuser_id = \"@nova:localhost\"\n",
        )?;
        assert_eq!(
            load_err(&with_file())?.key,
            "matrix.accounts.nova.homeserver",
            "a missing required key is named"
        );
        Ok(())
    });
}

#[test]
fn node_commands_are_validated() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "warden.toml",
            "[node]\ngateway_url = \"ws://127.0.0.1:18789/ws\"\n[node.commands.up]\nargv = []\n",
        )?;
        let err = load_err(&with_file())?;
        assert_eq!(
            err.to_string(),
            format!(
                "invalid config: node.commands.up.argv: must name a program: a non-empty list \
                 of strings (from file {})",
                abs("warden.toml")?
            )
        );
        Ok(())
    });
}

// ---- the shipped examples ----

#[test]
fn multi_account_example_is_valid() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "warden.toml",
            include_str!("../../config/examples/multi-account.toml"),
        )?;
        jail.create_dir("secrets")?;
        for name in ["admin", "nova_pw", "nova_rk", "orion", "owner", "box"] {
            jail.create_file(format!("secrets/{name}"), &format!("{name}-secret\n"))?;
        }
        jail.set_env("WARDEN_ADMIN__TOKEN_FILE", "secrets/admin");
        jail.set_env(
            "WARDEN_GATEWAY__OPERATORS__OWNER__TOKEN_FILE",
            "secrets/owner",
        );
        jail.set_env(
            "WARDEN_GATEWAY__NODES__BUILD-BOX__TOKEN_FILE",
            "secrets/box",
        );
        jail.set_env(
            "WARDEN_MATRIX__ACCOUNTS__NOVA__PASSWORD_FILE",
            "secrets/nova_pw",
        );
        jail.set_env(
            "WARDEN_MATRIX__ACCOUNTS__NOVA__RECOVERY_KEY_FILE",
            "secrets/nova_rk",
        );
        jail.set_env(
            "WARDEN_MATRIX__ACCOUNTS__ORION__ACCESS_TOKEN_FILE",
            "secrets/orion",
        );
        let c = load_ok(&with_file())?.config;
        assert_eq!(c.admin.token.as_deref(), Some("admin-secret"));
        let g = &c.gateway;
        assert_eq!(g.operators["owner"].token.as_deref(), Some("owner-secret"));
        assert_eq!(g.nodes["build-box"].token.as_deref(), Some("box-secret"));
        let orion = &c.matrix.accounts["orion"];
        assert_eq!(orion.access_token.as_deref(), Some("orion-secret"));
        assert!(c.matrix.accounts["nova"].approvals.enabled);
        let p = c.policy_for("matrix_account", Some(&orion.supervision));
        assert_eq!(
            (p.backoff.max, p.max_restarts),
            (Duration::from_secs(120), 10)
        );
        Ok(())
    });
}

#[test]
fn node_example_is_valid() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "warden.toml",
            include_str!("../../config/examples/node.toml"),
        )?;
        jail.create_file("token", "node-token\n")?;
        jail.set_env("WARDEN_NODE__TOKEN_FILE", "token");
        let c = load_ok(&with_file())?.config;
        let node = c.node.as_ref().ok_or("no [node]")?;
        assert_eq!(node.token.as_deref(), Some("node-token"));
        assert_eq!(node.commands["disk"].argv, ["df", "-h"]);
        assert!(node.commands["disk"].args && node.commands["disk"].approval);
        assert_eq!(node.commands["uptime"].timeout_ms, 60_000);
        Ok(())
    });
}

#[test]
fn matrix_accounts_name_what_is_wrong() {
    let cases = [
        (
            "homeserver = \"http://h\"\npassword = \"p\"\n",
            "matrix.accounts.nova.user_id: is required for a password login",
        ),
        (
            "homeserver = \"http://h\"\nuser_id = \"@nova:h\"\npassword = \"p\"\nallowed_rooms = [\"#ops:h\"]\n",
            "matrix.accounts.nova.allowed_rooms: \"#ops:h\" is not a room ID: give IDs like \
             \"!abc:server\", not aliases",
        ),
        (
            "homeserver = \"http://h\"\nuser_id = \"@nova:h\"\npassword = \"p\"\nallowed_senders = [\"owner\"]\n",
            "matrix.accounts.nova.allowed_senders: \"owner\" must be a full user ID like \
             @name:server, or \"*\"",
        ),
    ];
    for (account, expected) in cases {
        Jail::expect_with(|jail| {
            jail.create_file("warden.toml", &format!("[matrix.accounts.nova]\n{account}"))?;
            let err = load_err(&with_file())?;
            assert_eq!(
                err.to_string(),
                format!(
                    "invalid config: {expected} (from file {})",
                    abs("warden.toml")?
                )
            );
            Ok(())
        });
    }
    // An alias names a directory, a tree path and admin URLs: no dots or slashes.
    Jail::expect_with(|jail| {
        jail.create_file(
            "warden.toml",
            "[matrix.accounts.\"..\"]\nhomeserver = \"http://h\"\naccess_token = \"t\"\n",
        )?;
        let err = load_err(&with_file())?;
        assert_eq!(
            err.to_string(),
            format!(
                "invalid config: matrix.accounts...: an account alias is 1 to 64 of A-Z a-z 0-9 _ - (from file {})",
                abs("warden.toml")?
            )
        );
        Ok(())
    });
    // A token needs no user_id (a whoami finds it).
    Jail::expect_with(|jail| {
        jail.create_file(
            "warden.toml",
            "[matrix.accounts.nova]\nhomeserver = \"http://h\"\naccess_token = \"t\"\n",
        )?;
        let loaded = load_ok(&with_file())?;
        assert_eq!(loaded.config.matrix.accounts["nova"].user_id, None);
        Ok(())
    });
}

/// Principals and caps: a credential without a token, a cap of 0, an origin that is not
/// one — each names its key and source.
#[test]
fn principals_and_caps_are_validated() {
    let cases = [
        (
            "[gateway.operators.alice]\n",
            "gateway.operators.alice: needs token or token_file",
        ),
        (
            "[gateway.nodes.box]\ntoken = \"\"\n",
            "gateway.nodes.box.token: is empty",
        ),
        (
            "[gateway]\ntoken = \"same\"\n[gateway.nodes.box]\ntoken = \"same\"\n",
            "gateway.nodes.box.token: is the same token as gateway.token",
        ),
        (
            "[gateway]\nmax_connections = 0\n",
            "gateway.max_connections: must be above 0",
        ),
        (
            "[gateway]\nheader_read_timeout_ms = 0\n",
            "gateway.header_read_timeout_ms: must be above 0",
        ),
        (
            "[gateway]\nmax_pending_invocations = 0\n",
            "gateway.max_pending_invocations: must be above 0",
        ),
        (
            "[gateway]\nallowed_origins = [\"https://ok.example\", \"ops.example.com/x\"]\n",
            "gateway.allowed_origins[1]: \"ops.example.com/x\" is not an origin",
        ),
    ];
    for (toml, expected) in cases {
        Jail::expect_with(|jail| {
            jail.create_file("warden.toml", toml)?;
            let err = load_err(&with_file())?;
            let text = err.to_string();
            assert!(text.contains(expected), "{toml}: {text}");
            assert!(text.contains("warden.toml"), "names the file: {text}");
            Ok(())
        });
    }
    Jail::expect_with(|jail| {
        jail.create_file(
            "warden.toml",
            "[gateway]\nallowed_origins = [\"https://ops.example.com\"]\n\
             [gateway.operators.alice]\ntoken = \"a\"\n[gateway.nodes.box]\ntoken_file = \"box\"\n",
        )?;
        jail.create_file("box", "box-token\n")?;
        let loaded = load(&with_file()).map_err(|e| e.to_string())?;
        let g = &loaded.config.gateway;
        assert_eq!(g.nodes["box"].token.as_deref(), Some("box-token"));
        assert_eq!(g.operators["alice"].token.as_deref(), Some("a"));
        Ok(())
    });
}
