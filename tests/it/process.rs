//! Real-process tests: the `warden` binary on ephemeral ports, driven over HTTP and signals.
//!
//! Each test starts the binary with JSON logs, learns its bound ports from the log lines,
//! and waits on conditions with deadlines — never on fixed sleeps.

use std::time::Duration;

use tokio::time::Instant;

use crate::support::{BIN, Launch, Warden, poll_json, tree_node};

/// `warden run` with its gateway on `gateway` and the admin on a free port, with `envs`.
fn start(name: &str, gateway: &str, envs: &[(&str, &str)]) -> Warden {
    Launch::run(name).gateway_bind(gateway).envs(envs).spawn()
}

#[tokio::test]
async fn run_kill_restart_and_sigterm() {
    let mut warden = start("run", "127.0.0.1:0", &[]);
    let admin = warden.ready().await;

    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{admin}/admin/actors/root/gateway/listener/kill"))
        .send()
        .await
        .expect("kill request");
    assert_eq!(resp.status().as_u16(), 200, "{:?}", resp.text().await);

    let tree = poll_json(
        &format!("{admin}/admin/tree"),
        Duration::from_secs(10),
        |_, t| {
            tree_node(t, "root/gateway/listener")
                .is_some_and(|n| n["state"] == "running" && n["restarts_total"] == 1)
        },
    )
    .await;
    let listener = tree_node(&tree, "root/gateway/listener").expect("listener");
    assert_eq!(listener["generation"], 2);
    assert_eq!(listener["last_failure"]["class"], "transient");
    assert_eq!(listener["last_failure"]["reason"], "killed by operator");
    warden
        .wait_for_log("Restarting after failure.", Duration::from_secs(5))
        .await;

    // `warden tree` draws the same tree.
    let out = std::process::Command::new(BIN)
        .args(["tree", "--admin", &admin])
        .output()
        .expect("warden tree");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(
            "├── listener  running  permanent  [gateway_listener]  gen 2  restarts 1 (1 in window)"
        ),
        "{text}"
    );
    let health = std::process::Command::new(BIN)
        .args(["health", "--admin", &admin])
        .status()
        .expect("health");
    assert!(health.success());

    let t0 = Instant::now();
    warden.signal("-TERM");
    assert_eq!(warden.exit_code(Duration::from_secs(10)).await, 0);
    assert!(t0.elapsed() < Duration::from_secs(10));
    warden
        .wait_for_log("Shutdown complete.", Duration::from_secs(1))
        .await;
    // Down: health fails.
    let health = std::process::Command::new(BIN)
        .args(["health", "--admin", &admin])
        .status()
        .expect("health");
    assert_eq!(health.code(), Some(1));
}

#[tokio::test]
async fn listener_that_cannot_bind_exhausts_its_budget_and_exits_75() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let mut warden = start(
        "exit75",
        &addr,
        &[
            (
                "WARDEN_SUPERVISION__KINDS__GATEWAY_LISTENER__BACKOFF__INITIAL_MS",
                "10",
            ),
            (
                "WARDEN_SUPERVISION__KINDS__GATEWAY_LISTENER__BACKOFF__MAX_MS",
                "40",
            ),
        ],
    );
    assert_eq!(
        warden.exit_code(Duration::from_secs(20)).await,
        75,
        "logs:\n{}",
        warden.logs()
    );
    let gave_up = warden
        .wait_for_log(
            "A child gave up and its policy says exit; shutting down.",
            Duration::ZERO,
        )
        .await;
    assert_eq!(gave_up["actor"], "root/gateway/listener");
    let reason = gave_up["reason"].as_str().expect("reason");
    assert!(
        reason.starts_with("restart budget spent: 6 failures within 60000 ms"),
        "{reason}"
    );
    assert!(reason.contains("Address already in use"), "{reason}");
    drop(taken);
}

#[tokio::test]
async fn bad_config_exits_64_before_binding_with_the_key_and_source() {
    let out = Launch::new("bad-env", &["run"])
        .env("WARDEN_SUPERVISION__DEFAULTS__BACKOFF__MAX_MS", "\"5s\"")
        .output(Duration::from_secs(30))
        .await;
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("supervision.defaults.backoff.max_ms"), "{err}");
    assert!(
        err.contains("WARDEN_SUPERVISION__DEFAULTS__BACKOFF__MAX_MS"),
        "{err}"
    );

    let out = Launch::new("bad-env-check", &["config", "check"])
        .env("WARDEN_ADMIN__BIND", "0.0.0.0:18790")
        .output(Duration::from_secs(30))
        .await;
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("admin.bind") && err.contains("WARDEN_ADMIN__BIND"),
        "{err}"
    );
}

#[tokio::test]
async fn config_show_names_each_source_and_masks_secrets() {
    let out = Launch::new("show", &["config", "show"])
        .envs(&[
            ("WARDEN_SUPERVISION__DEFAULTS__BACKOFF__MAX_MS", "5000"),
            ("WARDEN_ADMIN__TOKEN", "s3cret-token"),
        ])
        .output(Duration::from_secs(30))
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("supervision.defaults.backoff.max_ms"))
        .expect("key shown");
    assert!(
        line.contains("5000") && line.contains("WARDEN_SUPERVISION__DEFAULTS__BACKOFF__MAX_MS"),
        "{line}"
    );
    let bind = text
        .lines()
        .find(|l| l.starts_with("gateway.bind"))
        .expect("key shown");
    assert!(bind.contains("built-in default"), "{bind}");
    assert!(!text.contains("s3cret-token"), "{text}");
}
