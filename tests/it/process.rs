//! Real-process tests: the `warden` binary on ephemeral ports, driven over HTTP and signals.
//!
//! Each test starts the binary with JSON logs, learns its bound ports from the log lines,
//! and waits on conditions with deadlines — never on fixed sleeps.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_warden");

/// A running `warden` process and its log lines.
pub(crate) struct Warden {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

/// A scratch directory removed on drop.
pub(crate) struct TempDir(pub(crate) std::path::PathBuf);

impl TempDir {
    pub(crate) fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("warden-it-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `warden` command with a clean environment (no inherited `WARDEN_*`) in `dir`.
pub(crate) fn command(dir: &TempDir, args: &[&str], envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(&dir.0).kill_on_drop(true);
    for (key, _) in std::env::vars() {
        if key.starts_with("WARDEN_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd.envs(envs.iter().copied());
    cmd
}

impl Warden {
    /// Starts `warden run` with the gateway on `gateway` and the admin on a free port.
    pub(crate) fn start(name: &str, gateway: &str, envs: &[(&str, &str)]) -> Self {
        let args = [
            "run",
            "--gateway-bind",
            gateway,
            "--admin-bind",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ];
        Self::spawn(TempDir::new(name), &args, envs)
    }

    /// Starts `warden` with `args` in `dir` (files for `--config` can be written there
    /// first), logging JSON lines to stderr.
    pub(crate) fn spawn(dir: TempDir, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut child = command(&dir, args, envs)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn warden");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                sink.lock().expect("lines").push(line);
            }
        });
        Self {
            child,
            lines,
            _dir: dir,
        }
    }

    pub(crate) fn logs(&self) -> String {
        self.lines.lock().expect("lines").join("\n")
    }

    /// Waits for a JSON log line whose message is `message`; returns it.
    pub(crate) async fn wait_for_log(&self, message: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let found = self
                .lines
                .lock()
                .expect("lines")
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| v["message"] == message);
            if let Some(v) = found {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no log {message:?} within {within:?}; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) async fn admin(&self) -> String {
        let line = self
            .wait_for_log("Admin endpoint listening.", Duration::from_secs(10))
            .await;
        format!("http://{}", line["addr"].as_str().expect("addr"))
    }

    pub(crate) fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to end however it ends (a signal too).
    pub(crate) async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!("still running after {within:?}; logs:\n{}", self.logs()),
        }
    }

    /// Whether the process still runs.
    pub(crate) fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub(crate) async fn exit_code(&mut self, within: Duration) -> i32 {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("wait").code().expect("exited, not signalled"),
            Err(_) => panic!("still running after {within:?}; logs:\n{}", self.logs()),
        }
    }
}

/// Polls `GET url` until `check` accepts the JSON body, or fails at the deadline.
pub(crate) async fn poll_json(
    url: &str,
    within: Duration,
    check: impl Fn(u16, &Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    let http = reqwest::Client::new();
    loop {
        let mut last = (0, Value::Null);
        if let Ok(resp) = http.get(url).send().await {
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            if check(status, &body) {
                return body;
            }
            last = (status, body);
        }
        assert!(
            Instant::now() < deadline,
            "{url}: condition not met within {within:?}; last: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn node<'a>(tree: &'a Value, path: &str) -> Option<&'a Value> {
    if tree["path"] == path {
        return Some(tree);
    }
    tree["children"]
        .as_array()?
        .iter()
        .find_map(|c| node(c, path))
}

#[tokio::test]
async fn run_kill_restart_and_sigterm() {
    let mut warden = Warden::start("run", "127.0.0.1:0", &[]);
    let admin = warden.admin().await;
    poll_json(
        &format!("{admin}/readyz"),
        Duration::from_secs(10),
        |s, _| s == 200,
    )
    .await;

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
            node(t, "root/gateway/listener")
                .is_some_and(|n| n["state"] == "running" && n["restarts_total"] == 1)
        },
    )
    .await;
    let listener = node(&tree, "root/gateway/listener").expect("listener");
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
    let mut warden = Warden::start(
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
    let dir = TempDir::new("bad-env");
    let out = command(
        &dir,
        &["run"],
        &[("WARDEN_SUPERVISION__DEFAULTS__BACKOFF__MAX_MS", "\"5s\"")],
    )
    .output()
    .await
    .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("supervision.defaults.backoff.max_ms"), "{err}");
    assert!(
        err.contains("WARDEN_SUPERVISION__DEFAULTS__BACKOFF__MAX_MS"),
        "{err}"
    );

    let out = command(
        &dir,
        &["config", "check"],
        &[("WARDEN_ADMIN__BIND", "0.0.0.0:18790")],
    )
    .output()
    .await
    .expect("check");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("admin.bind") && err.contains("WARDEN_ADMIN__BIND"),
        "{err}"
    );
}

#[tokio::test]
async fn config_show_names_each_source_and_masks_secrets() {
    let dir = TempDir::new("show");
    let out = command(
        &dir,
        &["config", "show"],
        &[
            ("WARDEN_SUPERVISION__DEFAULTS__BACKOFF__MAX_MS", "5000"),
            ("WARDEN_ADMIN__TOKEN", "s3cret-token"),
        ],
    )
    .output()
    .await
    .expect("show");
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
