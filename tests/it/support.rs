//! What the integration tests share, so that each test says only what it is about.
//!
//! * [`eventually`] — waits for a condition with a deadline and panics naming it (and what
//!   the last check saw) when the deadline passes. Every wait of these tests is one, or an
//!   acknowledgement; none is a fixed sleep.
//! * [`TempDir`] — a scratch directory, removed on drop.
//! * [`Launch`] → [`Warden`] — the one way to start a `warden` process: its arguments, a
//!   config file, its environment (never the inherited `WARDEN_*`), a directory; its output
//!   read back line by line, its JSON logs searched.
//! * [`Scenario`] → [`Rig`] — `warden run` with Matrix [`Account`]s (or none) on a state
//!   directory that outlives each start, for the Matrix and approvals tests.
//! * Gateway clients: [`operator`], [`connected_nodes`], [`wait_node`], [`next_event`];
//!   [`gateway_tree`], the `gateway` subtree started in this process.

use std::fmt::{self, Display};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use warden_actors::gateway::client::{ConnectError, ConnectOptions, GatewayClient, Incoming};
use warden_actors::gateway::protocol::{ClientInfo, Role};
use warden_actors::gateway::{self, GatewayState};
use warden_actors::supervision::{Jitter, Policy, Tree, TreeOptions};

use crate::synapse::User;

/// The `warden` binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_warden");

// ---------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------

/// What one check of [`eventually`] found: done, with a value, or not yet, with what it
/// saw (shown if the wait fails; empty when there is nothing to show).
pub(crate) trait Progress {
    /// What the wait returns once the check is done.
    type Done;
    /// Done, or what was seen instead.
    fn progress(self) -> Result<Self::Done, String>;
}

/// A condition: done when `true`.
impl Progress for bool {
    type Done = ();
    fn progress(self) -> Result<(), String> {
        if self { Ok(()) } else { Err(String::new()) }
    }
}

/// Done with the value, when there is one.
impl<T> Progress for Option<T> {
    type Done = T;
    fn progress(self) -> Result<T, String> {
        self.ok_or_else(String::new)
    }
}

/// Done with `Ok`; `Err` is what was seen instead.
impl<T, E: Display> Progress for Result<T, E> {
    type Done = T;
    fn progress(self) -> Result<T, String> {
        self.map_err(|seen| seen.to_string())
    }
}

/// The first pause between two checks of [`eventually`]; each next one is twice as long,
/// up to [`POLL_MAX`]: a condition that holds soon is seen soon, and one that takes seconds
/// (a Synapse, a restart) is not polled hard.
const POLL_FIRST: Duration = Duration::from_millis(5);

/// The longest pause between two checks of [`eventually`].
const POLL_MAX: Duration = Duration::from_millis(50);

/// Checks `check` until it is done, and returns what it returned; panics naming `what`,
/// with what the last check saw, when it is not done within `deadline`.
///
/// A check is an async closure answering a [`Progress`]: a condition (`async || n == 3`),
/// an `Option` (done with its value) or a `Result` (not done yet with `Err(seen)`). It runs
/// at once, then after pauses growing from 5 to 50 ms, and once more at the deadline. A
/// check that must stop the test at once (the server answered something impossible)
/// asserts inside.
pub(crate) async fn eventually<P: Progress>(
    deadline: Duration,
    what: impl Display,
    mut check: impl AsyncFnMut() -> P,
) -> P::Done {
    let until = Instant::now() + deadline;
    let mut pause = POLL_FIRST;
    loop {
        let seen = match check().await.progress() {
            Ok(done) => return done,
            Err(seen) => seen,
        };
        let now = Instant::now();
        if now >= until {
            if seen.is_empty() {
                panic!("not within {deadline:?}: {what}");
            }
            panic!("not within {deadline:?}: {what}\nlast seen: {seen}");
        }
        tokio::time::sleep(pause.min(until - now)).await;
        pause = (pause * 2).min(POLL_MAX);
    }
}

// ---------------------------------------------------------------------------------------
// Scratch directories
// ---------------------------------------------------------------------------------------

/// A scratch directory, `warden-it-<name>-<pid>-<n>` in the system's temporary directory:
/// new and empty, and removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    /// A new directory named after `name`.
    pub(crate) fn new(name: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("warden-it-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        Self(dir)
    }

    /// Where it is.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside it.
    pub(crate) fn join(&self, path: impl AsRef<Path>) -> PathBuf {
        self.0.join(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------
// warden processes
// ---------------------------------------------------------------------------------------

/// How to start one `warden` process: its arguments, a config file, its environment and
/// its directory (its own, unless it shares one: [`Launch::in_dir`]).
///
/// The process never sees the test's own `WARDEN_*` or `RUST_LOG` variables (warden reads
/// every `WARDEN_*` as config), only the ones set here.
pub(crate) struct Launch {
    /// Its working directory, where `warden.toml` is written; kept while it runs.
    dir: Arc<TempDir>,
    args: Vec<String>,
    /// The text of `warden.toml`, passed with `--config` when set.
    config: Option<String>,
    envs: Vec<(String, String)>,
    /// Variables of the test's environment the process does not get.
    removed: Vec<String>,
}

impl Launch {
    /// `warden ARGS` in a new directory named after `name`.
    pub(crate) fn new(name: &str, args: &[&str]) -> Self {
        Self::in_dir(&Arc::new(TempDir::new(name)), args)
    }

    /// `warden ARGS` in `dir`, which other processes may share (a generated token file).
    pub(crate) fn in_dir(dir: &Arc<TempDir>, args: &[&str]) -> Self {
        Self {
            dir: dir.clone(),
            args: args.iter().map(|a| a.to_string()).collect(),
            config: None,
            envs: Vec::new(),
            removed: Vec::new(),
        }
    }

    /// `warden run` logging JSON lines, with its gateway and admin endpoints on free ports.
    pub(crate) fn run(name: &str) -> Self {
        Self::new(
            name,
            &[
                "run",
                "--gateway-bind",
                "127.0.0.1:0",
                "--admin-bind",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ],
        )
    }

    /// `warden node` with `config` as its config file, logging JSON lines, with its admin
    /// endpoint on a free port. See [`node_config`].
    pub(crate) fn node(name: &str, config: &str) -> Self {
        let args = [
            "node",
            "--admin-bind",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ];
        Self::new(name, &args).config(config)
    }

    /// The gateway of [`Launch::run`] on `addr` instead.
    pub(crate) fn gateway_bind(mut self, addr: &str) -> Self {
        let flag = self
            .args
            .iter()
            .position(|a| a == "--gateway-bind")
            .expect("a `warden run` launch");
        self.args[flag + 1] = addr.to_string();
        self
    }

    /// Writes `toml` to `warden.toml` in the process's directory, and passes
    /// `--config warden.toml`.
    pub(crate) fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_string());
        self
    }

    /// Sets `key` in the process's environment.
    pub(crate) fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    /// Sets each of `envs`.
    pub(crate) fn envs(self, envs: &[(&str, &str)]) -> Self {
        envs.iter().fold(self, |launch, (k, v)| launch.env(k, v))
    }

    /// Keeps `key` of the test's environment from the process (unless set here).
    pub(crate) fn env_remove(mut self, key: &str) -> Self {
        self.removed.push(key.to_string());
        self
    }

    /// The process's directory.
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The command, killed when dropped; writes `warden.toml` first when there is one.
    pub(crate) fn command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        if let Some(toml) = &self.config {
            std::fs::write(self.dir.join("warden.toml"), toml).expect("write warden.toml");
            cmd.args(["--config", "warden.toml"]);
        }
        cmd.args(&self.args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for (key, _) in std::env::vars() {
            if key.starts_with("WARDEN_") || key == "RUST_LOG" {
                cmd.env_remove(key);
            }
        }
        for key in &self.removed {
            cmd.env_remove(key);
        }
        cmd.envs(self.envs.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Starts the process; see [`Warden`].
    pub(crate) fn spawn(self) -> Warden {
        let mut child = self
            .command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn warden");
        let (stdout, out) = read_lines(child.stdout.take().expect("stdout"));
        let (stderr, err) = read_lines(child.stderr.take().expect("stderr"));
        Warden {
            child,
            stdout,
            stderr,
            readers: vec![out, err],
            dir: self.dir,
        }
    }

    /// Runs the process to its end, which must come within `within`; returns its output.
    pub(crate) async fn output(self, within: Duration) -> Output {
        tokio::time::timeout(within, self.command().output())
            .await
            .unwrap_or_else(|_| panic!("warden {:?} still running after {within:?}", self.args))
            .expect("run warden")
    }
}

/// Lines read from a pipe as they come, by a task that ends with the pipe.
type Lines = Arc<Mutex<Vec<String>>>;

fn read_lines(pipe: impl AsyncRead + Unpin + Send + 'static) -> (Lines, JoinHandle<()>) {
    let lines = Lines::default();
    let sink = lines.clone();
    let task = tokio::spawn(async move {
        let mut reader = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            sink.lock().expect("lines").push(line);
        }
    });
    (lines, task)
}

/// A running `warden` process and the lines of its output so far. `warden run` and
/// `warden node` log to stderr; started by a [`Launch`] with `--log-format json`, each
/// line is a JSON object whose `message` [`Warden::wait_for_log`] looks for. Killed when
/// dropped.
pub(crate) struct Warden {
    child: Child,
    stdout: Lines,
    stderr: Lines,
    /// The tasks reading stdout and stderr: they end with the process; aborted on drop.
    readers: Vec<JoinHandle<()>>,
    /// Its working directory, kept while it runs.
    dir: Arc<TempDir>,
}

impl Warden {
    /// Its working directory.
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The stderr lines so far.
    pub(crate) fn stderr(&self) -> Vec<String> {
        self.stderr.lock().expect("lines").clone()
    }

    /// The stderr lines so far, as one text: the logs.
    pub(crate) fn logs(&self) -> String {
        self.stderr.lock().expect("lines").join("\n")
    }

    /// `what`, followed by the logs when displayed: the name of a wait whose failure
    /// should show them (they are read only then).
    pub(crate) fn with_logs<'a>(&'a self, what: impl Display + 'a) -> impl Display + 'a {
        WithLogs { what, warden: self }
    }

    /// The first JSON log line whose message is `message`, if there is one yet.
    pub(crate) fn log(&self, message: &str) -> Option<Value> {
        self.stderr
            .lock()
            .expect("lines")
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["message"] == message)
    }

    /// Every JSON log line so far whose message is `message`, in order.
    pub(crate) fn logs_of(&self, message: &str) -> Vec<Value> {
        self.stderr
            .lock()
            .expect("lines")
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == message)
            .collect()
    }

    /// Waits for a JSON log line whose message is `message`; returns it.
    pub(crate) async fn wait_for_log(&self, message: &str, within: Duration) -> Value {
        let what = self.with_logs(format!("no log {message:?}"));
        eventually(within, what, async || self.log(message)).await
    }

    /// Waits for a stderr line containing `needle`.
    pub(crate) async fn wait_for_stderr(&self, needle: &str, within: Duration) {
        let what = self.with_logs(format!("no stderr line with {needle:?}"));
        let seen = async || self.stderr().iter().any(|l| l.contains(needle));
        eventually(within, what, seen).await
    }

    /// The admin endpoint's base URL (`http://127.0.0.1:PORT`), once it listens.
    pub(crate) async fn admin(&self) -> String {
        let line = self
            .wait_for_log("Admin endpoint listening.", Duration::from_secs(10))
            .await;
        format!("http://{}", line["addr"].as_str().expect("addr"))
    }

    /// The admin endpoint's base URL, once `/readyz` answers 200.
    pub(crate) async fn ready(&self) -> String {
        let admin = self.admin().await;
        let readyz = format!("{admin}/readyz");
        poll_json(&readyz, Duration::from_secs(10), |status, _| status == 200).await;
        admin
    }

    /// The gateway's WebSocket URL (`ws://127.0.0.1:PORT/ws`), once it listens.
    pub(crate) async fn gateway(&self) -> String {
        let line = self
            .wait_for_log("Gateway endpoint listening.", Duration::from_secs(10))
            .await;
        format!("ws://{}/ws", line["addr"].as_str().expect("addr"))
    }

    /// Sends signal `sig` (`-TERM`, `-KILL` …) with `kill`.
    pub(crate) fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to end however it ends (a signal too).
    pub(crate) async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!("still running after {within:?}; logs:\n{}", self.logs()),
        }
    }

    /// Waits for the process to exit; returns its exit code.
    pub(crate) async fn exit_code(&mut self, within: Duration) -> i32 {
        let status = self.wait_exit(within).await;
        status.code().expect("exited, not signalled")
    }

    /// Whether the process still runs.
    pub(crate) fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the exit and the end of its output; returns (exit code, stdout, stderr
    /// lines).
    pub(crate) async fn finish(mut self, within: Duration) -> (i32, String, Vec<String>) {
        let code = self.exit_code(within).await;
        for reader in std::mem::take(&mut self.readers) {
            reader.await.expect("reader");
        }
        let stdout = self.stdout.lock().expect("lines").join("\n");
        (code, stdout, self.stderr())
    }
}

impl Drop for Warden {
    fn drop(&mut self) {
        for reader in &self.readers {
            reader.abort();
        }
    }
}

/// See [`Warden::with_logs`].
struct WithLogs<'a, W> {
    what: W,
    warden: &'a Warden,
}

impl<W: Display> Display for WithLogs<'_, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\nlogs:\n{}", self.what, self.warden.logs())
    }
}

/// The `[node]` table of a `warden node` connecting to `gateway_url` with `token` as
/// `name`; its commands follow.
pub(crate) fn node_config(gateway_url: &str, token: &str, name: &str) -> String {
    format!("[node]\ngateway_url = \"{gateway_url}\"\ntoken = \"{token}\"\nname = \"{name}\"\n")
}

/// A loopback port that was free a moment ago (for a server that must come back on the
/// same port, or a client that must find nobody there).
pub(crate) fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// Now, in ms since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Polls `GET url` until `check` accepts its status and JSON body; returns the body.
pub(crate) async fn poll_json(
    url: &str,
    within: Duration,
    check: impl Fn(u16, &Value) -> bool,
) -> Value {
    let http = reqwest::Client::new();
    eventually(within, format!("{url}: the condition"), async || {
        let resp = http.get(url).send().await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if check(status, &body) {
            Ok(body)
        } else {
            Err(format!("{status} {body}"))
        }
    })
    .await
}

/// The node of `tree` (the JSON of `/admin/tree`) at `path`.
pub(crate) fn tree_node<'a>(tree: &'a Value, path: &str) -> Option<&'a Value> {
    if tree["path"] == path {
        return Some(tree);
    }
    tree["children"]
        .as_array()?
        .iter()
        .find_map(|c| tree_node(c, path))
}

// ---------------------------------------------------------------------------------------
// Gateway clients
// ---------------------------------------------------------------------------------------

/// How the test clients introduce themselves.
pub(crate) fn client_info() -> ClientInfo {
    ClientInfo {
        name: "it".into(),
        version: "0".into(),
    }
}

/// An operator connection to the gateway at `url`, with credential `token`.
pub(crate) async fn operator(url: &str, token: &str) -> Result<GatewayClient, ConnectError> {
    let options = ConnectOptions::new(Role::Operator, token, client_info());
    Ok(GatewayClient::connect(url, options).await?.0)
}

/// The names of the nodes connected to the gateway at `url`, asked by an operator with
/// `token` on a connection of its own; none while the gateway cannot be reached.
pub(crate) async fn connected_nodes(url: &str, token: &str) -> Vec<String> {
    let Ok(mut op) = operator(url, token).await else {
        return Vec::new();
    };
    let nodes = op.call("nodes.list", json!({})).await;
    op.close().await;
    match nodes {
        Ok(Value::Array(nodes)) => nodes
            .iter()
            .filter(|n| n["connected"] == true)
            .filter_map(|n| n["name"].as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

/// Waits until node `name` is connected to the gateway at `url`.
pub(crate) async fn wait_node(url: &str, token: &str, name: &str, within: Duration) {
    eventually(within, format!("node {name} connected"), async || {
        let nodes = connected_nodes(url, token).await;
        if nodes.iter().any(|n| n == name) {
            Ok(())
        } else {
            Err(format!("connected: {nodes:?}"))
        }
    })
    .await
}

/// The payload of the next event named `name` on `client`, skipping any other (ticks);
/// `None` when none comes within `within`. Panics when the connection fails.
pub(crate) async fn next_event(
    client: &mut GatewayClient,
    name: &str,
    within: Duration,
) -> Option<Value> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, client.next_event()).await {
            Ok(Ok(Incoming::Event { event, payload })) if event == name => return Some(payload),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("waiting for {name}: the connection failed: {e}"),
            Err(_) => return None,
        }
    }
}

/// Starts the `gateway` subtree over `state` in this process, the way `warden run` does
/// ([`gateway::spec`] under a tree of its own, without jitter), its listener on the address
/// of `state`'s settings. Returns the tree, not yet handed to `state`, and where the
/// listener bound.
pub(crate) async fn gateway_tree(state: &GatewayState) -> (Tree, SocketAddr) {
    let bound = Arc::new(watch::Sender::new(None));
    let spec = gateway::spec(state, Policy::default(), bound.clone());
    let options = TreeOptions {
        jitter: Jitter::fixed(0.0),
        ..TreeOptions::default()
    };
    let tree = Tree::start(vec![spec], options).await.expect("tree");
    let addr = bound
        .borrow()
        .expect("the listener is bound once the tree has started");
    (tree, addr)
}

// ---------------------------------------------------------------------------------------
// warden run scenarios
// ---------------------------------------------------------------------------------------

/// One `[matrix.accounts.<alias>]` table of a [`Scenario`].
#[derive(Clone)]
pub(crate) struct Account {
    alias: String,
    /// The lines of the table after `homeserver`.
    lines: Vec<String>,
    homeserver: String,
}

impl Account {
    /// An account at `homeserver` (Synapse, or a fault proxy in front of it) with no
    /// credential yet.
    fn at(alias: &str, homeserver: &str) -> Self {
        Self {
            alias: alias.to_string(),
            lines: Vec::new(),
            homeserver: homeserver.to_string(),
        }
    }

    /// Logs in as `user` with its password.
    pub(crate) fn password(alias: &str, homeserver: &str, user: &User) -> Self {
        Self::at(alias, homeserver)
            .user_id(user)
            .line(&format!("password = \"{}\"", user.password))
    }

    /// Logs in as `user` with a password that is not its own.
    pub(crate) fn wrong_password(alias: &str, homeserver: &str, user: &User) -> Self {
        Self::at(alias, homeserver)
            .user_id(user)
            .line(&format!("password = \"not-{}\"", user.password))
    }

    /// Uses `token` as it is: no `user_id` or `device_id` unless added.
    pub(crate) fn token(alias: &str, homeserver: &str, token: &str) -> Self {
        Self::at(alias, homeserver).line(&format!("access_token = \"{token}\""))
    }

    /// Names `user`'s id.
    pub(crate) fn user_id(self, user: &User) -> Self {
        let line = format!("user_id = \"{}\"", user.user_id);
        self.line(&line)
    }

    /// Names the device of the token.
    pub(crate) fn device_id(self, device: &str) -> Self {
        self.line(&format!("device_id = \"{device}\""))
    }

    /// Forwards the messages of `owner` only (`allowed_senders`).
    pub(crate) fn allow(self, owner: &User) -> Self {
        let line = format!("allowed_senders = [\"{}\"]", owner.user_id);
        self.line(&line)
    }

    /// Enables approvals with `approver` as the one approver (and allowed sender).
    pub(crate) fn approvals(self, approver: &User) -> Self {
        let line = format!(
            "approvals = {{ enabled = true, approvers = [\"{}\"] }}",
            approver.user_id
        );
        self.allow(approver).line(&line)
    }

    /// Any other line of the table.
    pub(crate) fn line(mut self, toml: &str) -> Self {
        self.lines.push(toml.to_string());
        self
    }

    fn toml(&self) -> String {
        let mut table = format!(
            "[matrix.accounts.{}]\nhomeserver = \"{}\"\n",
            self.alias, self.homeserver
        );
        for line in &self.lines {
            table.push_str(line);
            table.push('\n');
        }
        table
    }
}

/// A `warden run` scenario: Matrix accounts (or none), more config, and a state directory
/// that outlives each [`start`](Scenario::start), so that a test can stop warden and start
/// it again on the same state. Operators and nodes authenticate with `token`; unlisted
/// nodes are admitted. The SDK logs at INFO, for a failing test's output.
#[derive(Clone)]
pub(crate) struct Scenario {
    name: String,
    token: String,
    /// Kept by every [`Rig`] too: it outlives a scenario built and started at once.
    state: Arc<TempDir>,
    /// TOML before the accounts.
    prelude: String,
    accounts: Vec<Account>,
    gateway_bind: String,
}

impl Scenario {
    /// A scenario named `name` (its directories are), with operator credential `token`.
    pub(crate) fn new(name: &str, token: &str) -> Self {
        Self {
            name: name.to_string(),
            token: token.to_string(),
            state: Arc::new(TempDir::new(&format!("state-{name}"))),
            prelude: String::new(),
            accounts: Vec::new(),
            gateway_bind: "127.0.0.1:0".to_string(),
        }
    }

    /// Adds `toml` before the accounts (e.g. a `[gateway]` table).
    pub(crate) fn config(mut self, toml: &str) -> Self {
        self.prelude.push_str(toml);
        self.prelude.push('\n');
        self
    }

    /// Puts the gateway on `addr` (one that must stay the same across starts).
    pub(crate) fn gateway_bind(mut self, addr: &str) -> Self {
        self.gateway_bind = addr.to_string();
        self
    }

    /// Adds an account.
    pub(crate) fn account(mut self, account: Account) -> Self {
        self.accounts.push(account);
        self
    }

    /// Adds accounts.
    pub(crate) fn accounts(mut self, accounts: impl IntoIterator<Item = Account>) -> Self {
        self.accounts.extend(accounts);
        self
    }

    /// The state directory (`state.dir`), shared by every start.
    pub(crate) fn state(&self) -> &Path {
        self.state.path()
    }

    /// The text of its `warden.toml`: the prelude, then the accounts.
    pub(crate) fn toml(&self) -> String {
        std::iter::once(self.prelude.clone())
            .chain(self.accounts.iter().map(Account::toml))
            .collect()
    }

    /// Starts `warden run` and waits until its admin and gateway endpoints listen and it
    /// has started.
    pub(crate) async fn start(&self) -> Rig {
        let config = self.toml();
        let state = self.state().to_str().expect("utf-8 path");
        let warden = Launch::run(&self.name)
            .gateway_bind(&self.gateway_bind)
            .config(&config)
            .env("WARDEN_GATEWAY__TOKEN", &self.token)
            .env("WARDEN_GATEWAY__ALLOW_UNLISTED_NODES", "true")
            .env("WARDEN_STATE__DIR", state)
            // Make the SDK's part visible in a failing test's output.
            .env("RUST_LOG", "info")
            .spawn();
        let admin = warden.admin().await;
        let gateway = warden.gateway().await;
        warden
            .wait_for_log("warden started.", Duration::from_secs(10))
            .await;
        Rig {
            warden,
            admin,
            gateway,
            token: self.token.clone(),
            _state: self.state.clone(),
        }
    }
}

/// A running [`Scenario`].
pub(crate) struct Rig {
    /// The process.
    pub(crate) warden: Warden,
    /// The admin endpoint's base URL.
    pub(crate) admin: String,
    /// The gateway's WebSocket URL.
    pub(crate) gateway: String,
    /// The operators' credential.
    token: String,
    /// The scenario's state directory, kept while warden runs.
    _state: Arc<TempDir>,
}

impl Rig {
    /// The node at `path` of the tree, `Null` while there is none.
    pub(crate) async fn tree_node(&self, path: &str) -> Value {
        let tree: Value = reqwest::get(format!("{}/admin/tree", self.admin))
            .await
            .expect("GET /admin/tree")
            .json()
            .await
            .expect("tree JSON");
        tree_node(&tree, path).cloned().unwrap_or(Value::Null)
    }

    /// Waits until the node at `path` satisfies `check`; returns it.
    pub(crate) async fn wait_tree_node(
        &self,
        path: &str,
        within: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let what = self.warden.with_logs(format!("{path}: the condition"));
        eventually(within, what, async || {
            let node = self.tree_node(path).await;
            if check(&node) {
                Ok(node)
            } else {
                Err(format!("{node:#}"))
            }
        })
        .await
    }

    /// The tree node of `<alias>`'s client.
    pub(crate) async fn client_node(&self, alias: &str) -> Value {
        self.tree_node(&client_path(alias)).await
    }

    /// Waits until `<alias>`'s client satisfies `check`; returns its node.
    pub(crate) async fn wait_client(
        &self,
        alias: &str,
        within: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_tree_node(&client_path(alias), within, check)
            .await
    }

    /// Kills `<alias>`'s client over the admin endpoint (its supervisor restarts it).
    pub(crate) async fn kill_client(&self, alias: &str) {
        let kill = format!("{}/admin/actors/{}/kill", self.admin, client_path(alias));
        let status = reqwest::Client::new()
            .post(kill)
            .send()
            .await
            .expect("POST kill")
            .status();
        assert!(status.is_success(), "kill {alias}'s client: {status}");
    }

    /// Kills `<alias>`'s client and waits until a new incarnation is ready; returns its node.
    pub(crate) async fn restart_client(&self, alias: &str, within: Duration) -> Value {
        let before = self.client_node(alias).await["generation"].as_u64();
        self.kill_client(alias).await;
        self.wait_client(alias, within, |n| {
            n["generation"].as_u64() > before && n["ready"] == true
        })
        .await
    }

    /// Waits until `<alias>` is ready (its first sync done).
    pub(crate) async fn wait_ready(&self, alias: &str, within: Duration) -> Value {
        self.wait_client(alias, within, |n| n["ready"] == true)
            .await
    }

    /// Waits until `<alias>`'s approval handler is ready (subscribed); returns its node.
    pub(crate) async fn wait_handler(&self, alias: &str, within: Duration) -> Value {
        let path = format!("root/channels/matrix/{alias}/approvals");
        self.wait_tree_node(&path, within, |n| n["ready"] == true)
            .await
    }

    /// Waits until node `name` is connected to the gateway.
    pub(crate) async fn wait_node(&self, name: &str, within: Duration) {
        wait_node(&self.gateway, &self.token, name, within).await
    }

    /// The text of `/metrics`.
    pub(crate) async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// A new operator connection.
    pub(crate) async fn connect(&self) -> Result<GatewayClient, ConnectError> {
        operator(&self.gateway, &self.token).await
    }

    /// An operator subscribed to `chat.message`.
    pub(crate) async fn operator(&self) -> GatewayClient {
        self.subscribed(&["chat.message"]).await
    }

    /// An operator subscribed to `events`.
    pub(crate) async fn subscribed(&self, events: &[&str]) -> GatewayClient {
        let mut op = self.connect().await.expect("operator connects");
        op.call("subscribe", json!({ "events": events }))
            .await
            .expect("subscribe");
        op
    }

    /// `chat.send` as a one-off operator.
    pub(crate) async fn chat_send(&self, params: Value) -> Result<Value, String> {
        let mut op = self.operator().await;
        let result = op
            .call("chat.send", params)
            .await
            .map_err(|e| e.to_string());
        op.close().await;
        result
    }
}

/// The tree path of `<alias>`'s client.
fn client_path(alias: &str) -> String {
    format!("root/channels/matrix/{alias}/client")
}

// ---------------------------------------------------------------------------------------
// promtool
// ---------------------------------------------------------------------------------------

/// The `promtool` that `PROMTOOL` names (scripts/test.sh finds one and sets it). Unset, it
/// is `None` (the caller skips, saying so), except under `CI=true`, where it is an error.
pub(crate) fn promtool() -> anyhow::Result<Option<std::ffi::OsString>> {
    let promtool = std::env::var_os("PROMTOOL");
    anyhow::ensure!(
        promtool.is_some() || std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but PROMTOOL is not set: run the suite through ./scripts/test.sh"
    );
    Ok(promtool)
}

/// Runs `promtool check metrics` on `text` (the metrics of `what`); fails with promtool's
/// verdict and the text.
pub(crate) async fn promtool_check(
    promtool: &std::ffi::OsStr,
    what: &str,
    text: &str,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use tokio::io::AsyncWriteExt as _;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {}", promtool.to_string_lossy()))?;
    let mut stdin = child.stdin.take().context("promtool's stdin")?;
    stdin.write_all(text.as_bytes()).await?;
    drop(stdin);
    let output = child.wait_with_output().await?;
    anyhow::ensure!(
        output.status.success(),
        "promtool check metrics failed on the metrics of {what} ({}):\n{}{}\n--- metrics ---\n{text}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
