//! Real-process tests of node mode: `warden node` processes connected to a `warden run`
//! gateway that is stopped, killed and restarted under them, and to a fake gateway played
//! by the test, which sends `node.invoke` requests no real gateway would (forged and
//! replayed grants, more invocations than the node runs at once).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use warden_actors::gateway::protocol::auth::Secret;
use warden_actors::gateway::protocol::grant::Grant;
use warden_actors::gateway::protocol::{CommandInfo, ConnectParams, ErrorBody, Frame};

use crate::support::{
    Launch, TempDir, Warden, connected_nodes, eventually, free_port, node_config, now_ms, operator,
    poll_json,
};

const TOKEN: &str = "node-test-token";

fn gateway(name: &str, addr: &str) -> Warden {
    Launch::run(name)
        .gateway_bind(addr)
        .env("WARDEN_GATEWAY__TOKEN", TOKEN)
        .env("WARDEN_GATEWAY__ALLOW_UNLISTED_NODES", "true")
        .spawn()
}

/// Starts `warden node` named `name` against `url`, with extra `[node]` lines.
fn node(name: &str, url: &str, token: &str, extra: &str) -> Warden {
    let config = format!(
        r#"{}{extra}
[node.commands.hello]
argv = ["echo", "hello from {name}"]
[node.commands.slow]
argv = ["sleep", "5"]
"#,
        node_config(url, token, name)
    );
    Launch::node(name, &config).spawn()
}

/// Calls `method` as an operator.
async fn call(url: &str, method: &str, params: Value) -> Result<Value, String> {
    let mut client = operator(url, TOKEN).await.map_err(|e| e.to_string())?;
    let result = client.call(method, params).await.map_err(|e| e.to_string());
    client.close().await;
    result
}

/// Waits until `n` nodes are connected; returns when that was seen.
async fn until_connected(url: &str, n: usize, within: Duration) -> Instant {
    eventually(within, format!("{n} nodes connected"), async || {
        let now = connected_nodes(url, TOKEN).await;
        if now.len() == n {
            Ok(Instant::now())
        } else {
            Err(format!(
                "only {} of {n} nodes connected: {now:?}",
                now.len()
            ))
        }
    })
    .await
}

/// Starts a gateway on `addr` and returns it with the instant its /readyz answered 200.
async fn gateway_ready(name: &str, addr: &str) -> (Warden, Instant) {
    let gw = gateway(name, addr);
    gw.ready().await;
    (gw, Instant::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_nodes_come_back_within_a_second_of_readyz_after_sigterm_and_kill_9() {
    let addr = format!("127.0.0.1:{}", free_port());
    let url = format!("ws://{addr}/ws");
    let (mut gw, _) = gateway_ready("nodes-gw1", &addr).await;
    let mut nodes: Vec<Warden> = (0..20)
        .map(|i| node(&format!("n{i:02}"), &url, TOKEN, ""))
        .collect();
    until_connected(&url, 20, Duration::from_secs(30)).await;

    for (round, how) in [(2, "-TERM"), (3, "-KILL")] {
        let down = Instant::now();
        gw.signal(how);
        let status = gw.wait_exit(Duration::from_secs(15)).await;
        if how == "-TERM" {
            assert_eq!(status.code(), Some(0), "graceful stop");
        }
        // The scenario: the gateway stays down for 2 s. The outage is what the test is
        // about, not a wait for a condition.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (next, ready) = gateway_ready(&format!("nodes-gw{round}"), &addr).await;
        gw = next;
        let back = until_connected(&url, 20, Duration::from_secs(10)).await;
        eprintln!(
            "{how}: gateway ready {:.2} s after going down; all 20 nodes back {} ms after /readyz",
            (ready - down).as_secs_f64(),
            (back - ready).as_millis()
        );
        assert!(
            back - ready <= Duration::from_secs(1),
            "{how}: nodes took {:?} after /readyz",
            back - ready
        );
    }
    for (i, n) in nodes.iter_mut().enumerate() {
        assert!(n.is_running(), "node {i} died");
        let attempts = n.logs().matches("Restarting after failure.").count();
        assert!(
            attempts >= 2,
            "node {i} logged {attempts} attempts:\n{}",
            n.logs()
        );
        assert!(
            n.logs().contains("Lost the connection to the gateway."),
            "node {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoke_through_a_real_node_timeout_and_offline() {
    let addr = format!("127.0.0.1:{}", free_port());
    let url = format!("ws://{addr}/ws");
    let (_gw, _) = gateway_ready("invoke-gw", &addr).await;
    let mut box1 = node("box1", &url, TOKEN, "");
    until_connected(&url, 1, Duration::from_secs(20)).await;

    let out = call(
        &url,
        "nodes.invoke",
        json!({"node": "box1", "command": "hello"}),
    )
    .await
    .expect("invoke");
    assert_eq!(
        (out["exit_code"].as_i64(), out["stdout"].as_str()),
        (Some(0), Some("hello from box1\n"))
    );
    let err = call(
        &url,
        "nodes.invoke",
        json!({"node": "box1", "command": "slow", "timeout_ms": 300}),
    )
    .await
    .expect_err("times out");
    assert!(err.contains("timeout"), "{err}");
    let err = call(
        &url,
        "nodes.invoke",
        json!({"node": "box1", "command": "rm"}),
    )
    .await
    .expect_err("undeclared");
    assert!(err.contains("unknown_command"), "{err}");

    // The node's /healthz reports its connection.
    let admin = box1.admin().await;
    let health = poll_json(
        &format!("{admin}/healthz"),
        Duration::from_secs(5),
        |s, b| s == 200 && b["connected"] == true,
    )
    .await;
    assert_eq!(health["consecutive_failures"], 0);
    assert!(health["last_connected_at"].is_string(), "{health}");

    box1.signal("-TERM");
    assert_eq!(box1.exit_code(Duration::from_secs(10)).await, 0);
    eventually(Duration::from_secs(5), "box1 is offline", async || {
        let err = call(
            &url,
            "nodes.invoke",
            json!({"node": "box1", "command": "hello"}),
        )
        .await
        .expect_err("offline");
        if err.contains("node_offline") {
            Ok(())
        } else {
            Err(err)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_token_is_fatal_and_exits_78() {
    let addr = format!("127.0.0.1:{}", free_port());
    let url = format!("ws://{addr}/ws");
    let (_gw, _) = gateway_ready("token-gw", &addr).await;
    let mut intruder = node("intruder", &url, "wrong-token", "");
    assert_eq!(
        intruder.exit_code(Duration::from_secs(15)).await,
        78,
        "{}",
        intruder.logs()
    );
    assert!(
        intruder.logs().contains("check node.token"),
        "{}",
        intruder.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_disconnected_too_long_exits_75() {
    let url = format!("ws://127.0.0.1:{}/ws", free_port());
    let t0 = Instant::now();
    let mut lonely = node("lonely", &url, TOKEN, "max_disconnected_ms = 800");
    assert_eq!(
        lonely.exit_code(Duration::from_secs(15)).await,
        75,
        "{}",
        lonely.logs()
    );
    assert!(t0.elapsed() >= Duration::from_millis(800));
    assert!(
        lonely.logs().contains("max_disconnected_ms"),
        "{}",
        lonely.logs()
    );
}

// ---- against a fake gateway ----

/// How long any one step of the fake-gateway tests may take.
const STEP: Duration = Duration::from_secs(15);

/// A gateway played by the test: it accepts a node, handshakes, and then sends whatever
/// `node.invoke` the test wants.
struct FakeGateway {
    listener: TcpListener,
    url: String,
}

/// One node's socket on the fake gateway.
struct NodeSocket {
    ws: WebSocketStream<TcpStream>,
    /// What the node sent in `connect`.
    connect: ConnectParams,
    last_id: u64,
}

impl FakeGateway {
    async fn bind() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("ws://{}/ws", listener.local_addr().expect("addr"));
        Self { listener, url }
    }

    /// Accepts the next node: challenge, `connect`, `hello-ok` (no ticks).
    async fn accept(&self) -> NodeSocket {
        let handshake = async {
            let (tcp, _) = self.listener.accept().await.expect("accept");
            let mut ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
            let challenge = Frame::event("connect.challenge", json!({"nonce": "n", "ts": 0}));
            ws.send(Message::text(challenge.to_text()))
                .await
                .expect("challenge");
            let Some(Frame::Req { id, method, params }) = next_frame(&mut ws).await else {
                panic!("expected connect");
            };
            assert_eq!(method, "connect");
            let hello = json!({
                "type": "hello-ok",
                "server": {"version": "fake"},
                "policy": {"tick_interval_ms": 0, "max_frame_bytes": 1 << 20},
            });
            ws.send(Message::text(Frame::ok(id, hello).to_text()))
                .await
                .expect("hello");
            let connect = serde_json::from_value(params).expect("connect params");
            NodeSocket {
                ws,
                connect,
                last_id: 0,
            }
        };
        tokio::time::timeout(STEP, handshake)
            .await
            .expect("the node connects")
    }
}

/// The next protocol frame, or `None` once the socket is closed.
async fn next_frame(ws: &mut WebSocketStream<TcpStream>) -> Option<Frame> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(text)) => return Some(Frame::parse(text.as_str()).expect("frame")),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

impl NodeSocket {
    /// Sends `node.invoke` with `params`; returns its request id.
    async fn send_invoke(&mut self, params: Value) -> String {
        self.last_id += 1;
        let id = format!("g{}", self.last_id);
        let req = Frame::Req {
            id: id.clone(),
            method: "node.invoke".to_string(),
            params,
        };
        self.ws
            .send(Message::text(req.to_text()))
            .await
            .expect("send");
        id
    }

    /// The next answer: (request id, result).
    async fn answer(&mut self) -> (String, Result<Value, ErrorBody>) {
        let frame = tokio::time::timeout(STEP, next_frame(&mut self.ws))
            .await
            .expect("an answer in time");
        match frame {
            Some(Frame::Res {
                id,
                ok: true,
                payload,
                ..
            }) => (id, Ok(payload.unwrap_or(Value::Null))),
            Some(Frame::Res {
                id,
                error: Some(error),
                ..
            }) => (id, Err(error)),
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    /// Sends `node.invoke` and waits for its answer (nothing else may be open).
    async fn invoke(&mut self, params: Value) -> Result<Value, ErrorBody> {
        let id = self.send_invoke(params).await;
        let (answered, result) = self.answer().await;
        assert_eq!(answered, id);
        result
    }
}

/// Starts `warden node` with `config` (TOML) and `envs` in a fresh directory named after
/// `dir_name`; returns it with that directory, where its commands run too.
fn node_with(dir_name: &str, config: &str, envs: &[(&str, &str)]) -> (Warden, PathBuf) {
    let node = Launch::node(dir_name, config).envs(envs).spawn();
    let dir = node.dir().to_path_buf();
    (node, dir)
}

/// The live (not zombie) processes of process group `pgid`.
fn live_in_group(pgid: i32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|entry| {
        let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid pgrp …`
        let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
        let state = rest.next()?;
        let pgrp: i32 = rest.nth(1)?.parse().ok()?;
        (pgrp == pgid && state != "Z" && state != "X").then_some(())
    })
    .count()
}

fn exists(dir: &Path, file: &str) -> bool {
    dir.join(file).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_runs_an_approval_command_only_with_a_valid_unused_grant_and_leaks_no_env() {
    let gw = FakeGateway::bind().await;
    let config = format!(
        r#"[node]
gateway_url = "{}"
name = "vault"
[node.commands.env]
argv = ["env"]
[node.commands.guarded]
argv = ["echo", "approved"]
args = true
approval = true
"#,
        gw.url
    );
    // The token comes from the environment, as in a container: `env` must not see it.
    let (mut node, _) = node_with("trust-vault", &config, &[("WARDEN_NODE__TOKEN", TOKEN)]);
    let mut socket = gw.accept().await;
    assert_eq!(socket.connect.token, TOKEN);
    let announced = socket.connect.node.clone().expect("node info").commands;
    assert_eq!(
        announced,
        [
            CommandInfo::plain("env"),
            CommandInfo {
                name: "guarded".into(),
                approval: true
            }
        ]
    );

    let args = json!(["the-vault"]);
    let expires = now_ms() + 60_000;
    let err = socket
        .invoke(json!({"command": "guarded", "args": args}))
        .await
        .expect_err("no grant");
    assert_eq!(err.code, "approval_required", "{err:?}");

    let forged = Grant::issue(
        &Secret::new("not-the-node-token"),
        "appr-1",
        "vault",
        "guarded",
        &args,
        expires,
    );
    let err = socket
        .invoke(json!({"command": "guarded", "args": args, "grant": forged}))
        .await
        .expect_err("signed with another key");
    assert_eq!(err.code, "forbidden", "{err:?}");
    assert!(err.message.contains("not valid"), "{err:?}");

    let grant = Grant::issue(
        &Secret::new(TOKEN),
        "appr-2",
        "vault",
        "guarded",
        &args,
        expires,
    );
    let out = socket
        .invoke(json!({"command": "guarded", "args": args, "grant": grant}))
        .await
        .expect("a valid grant runs the command");
    assert_eq!(out["stdout"], "approved the-vault\n");
    let err = socket
        .invoke(json!({"command": "guarded", "args": args, "grant": grant}))
        .await
        .expect_err("replayed");
    assert_eq!(err.code, "forbidden", "{err:?}");
    assert!(err.message.contains("already used"), "{err:?}");

    let out = socket
        .invoke(json!({"command": "env"}))
        .await
        .expect("env runs");
    let env = out["stdout"].as_str().expect("stdout");
    assert!(env.contains("PATH="), "{env}");
    assert!(!env.contains("WARDEN_"), "{env}");
    assert!(!env.contains(TOKEN), "{env}");
    assert!(node.is_running(), "{}", node.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_runs_four_at_once_queues_the_fifth_and_refuses_the_sixth() {
    let gw = FakeGateway::bind().await;
    let dir_name = "trust-queue";
    // Each run marks its start and holds until the test lets it go (30 s at most, should
    // a failed test leave it behind).
    let config = format!(
        r#"[node]
gateway_url = "{}"
token = "{TOKEN}"
name = "busy"
max_concurrent_commands = 4
max_queued_commands = 1
[node.commands.hold]
argv = ["sh", "-c", "touch started.$1; i=0; while [ ! -e go.$1 ] && [ $i -lt 1500 ]; do sleep 0.02; i=$((i+1)); done; echo $1", "hold"]
args = true
"#,
        gw.url
    );
    let (node, dir) = node_with(dir_name, &config, &[]);
    let mut socket = gw.accept().await;
    let hold = |n: u32| json!({"command": "hold", "args": [n.to_string()]});

    let mut ids = Vec::new();
    for n in 1..=4 {
        ids.push(socket.send_invoke(hold(n)).await);
    }
    eventually(STEP, "four runs started", async || {
        (1..=4).all(|n| exists(&dir, &format!("started.{n}")))
    })
    .await;
    let fifth = socket.send_invoke(hold(5)).await;
    let sixth = socket.send_invoke(hold(6)).await;
    let (id, result) = socket.answer().await;
    assert_eq!(
        id, sixth,
        "the sixth is answered at once; the others still run or wait"
    );
    let err = result.expect_err("busy");
    assert_eq!(err.code, "busy", "{err:?}");
    assert!(err.message.contains("node.max_queued_commands"), "{err:?}");
    assert!(!exists(&dir, "started.5"), "the fifth waits while four run");

    std::fs::write(dir.join("go.2"), "").expect("release 2");
    let (id, result) = socket.answer().await;
    assert_eq!(id, ids[1]);
    assert_eq!(result.expect("2 ran")["stdout"], "2\n");
    eventually(
        STEP,
        "the fifth started once the second ended",
        async || exists(&dir, "started.5"),
    )
    .await;

    for n in [1, 3, 4, 5] {
        std::fs::write(dir.join(format!("go.{n}")), "").expect("release");
    }
    let mut answered = Vec::new();
    for _ in 0..4 {
        let (id, result) = socket.answer().await;
        assert!(result.is_ok(), "{id}: {result:?}");
        answered.push(id);
    }
    answered.sort();
    let mut expected = vec![ids[0].clone(), ids[2].clone(), ids[3].clone(), fifth];
    expected.sort();
    assert_eq!(answered, expected);
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_kills_the_process_groups_of_its_runs() {
    let gw = FakeGateway::bind().await;
    let dir_name = "trust-lost";
    let config = format!(
        r#"[node]
gateway_url = "{}"
token = "{TOKEN}"
name = "orphan"
[node.commands.linger]
argv = ["sh", "-c", "sleep 60 & echo $$ > pgid.tmp && mv pgid.tmp pgid; wait"]
"#,
        gw.url
    );
    let (mut node, dir) = node_with(dir_name, &config, &[]);
    let mut socket = gw.accept().await;
    socket.send_invoke(json!({"command": "linger"})).await;
    let pgid = || {
        std::fs::read_to_string(dir.join("pgid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
    };
    eventually(
        STEP,
        "the run and its background sleep are up",
        async || pgid().is_some_and(|g| live_in_group(g) >= 2),
    )
    .await;
    let pgid = pgid().expect("pgid");

    drop(socket);
    eventually(STEP, "the run's process group is gone", async || {
        live_in_group(pgid) == 0
    })
    .await;
    // The node reconnects: the restart of its connection actor is the reconnect.
    let _again = gw.accept().await;
    assert!(node.is_running(), "{}", node.logs());
}

#[tokio::test]
async fn a_node_without_a_token_exits_64_naming_node_token() {
    let dir = Arc::new(TempDir::new("trust-no-token"));
    let config = "[node]\ngateway_url = \"ws://127.0.0.1:9/ws\"\n\
                  [node.commands.up]\nargv = [\"uptime\"]\n";
    for args in [&["node"][..], &["config", "check"][..]] {
        let out = Launch::in_dir(&dir, args).config(config).output(STEP).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("node.token"), "{err}");
    }
}

/// The value of the metric line starting with `name` in `/metrics` text; 0 when absent (a
/// counter appears once first incremented).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |sum, v| sum + v)
}

/// Issue 14: 100 node hosts (in this process, as `warden node` runs them) on one gateway;
/// `warden run` is SIGTERMed and started again at once on the same port. Every node comes
/// back, none of them meets a handshake timeout or a 503 (the new gateway's own counters),
/// and they come back close to the moment the new gateway answers `/readyz`: p99 within
/// 250 ms (the issue's bound; a debug build here measures 50-80 ms, and without the fast
/// retry inside the announced restart about 460 ms; the nodes used to wait out the 1 s
/// `expected_back_ms` hint). The p50/p99/max are printed; `cargo bench --bench gateway --
/// node-return` measures the release build (BENCHMARKS.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_nodes_are_back_as_soon_as_the_restarted_gateway_is_ready() {
    use warden_actors::node::connection::{self, ConnectionConfig, NodeStatus};
    use warden_actors::supervision::{ChildSpec, Strategy, Tree, TreeOptions};

    const NODES: usize = 100;
    let addr = format!("127.0.0.1:{}", free_port());
    let scenario = crate::support::Scenario::new("node-return", TOKEN).gateway_bind(&addr);
    let mut rig = scenario.start().await;
    let statuses: Vec<Arc<NodeStatus>> = (0..NODES).map(|_| Arc::new(NodeStatus::new())).collect();
    let specs = statuses
        .iter()
        .enumerate()
        .map(|(i, status)| {
            let config = ConnectionConfig {
                gateway_url: rig.gateway.clone(),
                token: TOKEN.to_string(),
                name: format!("return-{i}"),
                commands: Arc::new(std::collections::BTreeMap::new()),
                handshake_timeout: Duration::from_secs(10),
                reconnect_window: Duration::from_secs(10),
                reconnect_within: Duration::from_millis(500),
            };
            let connection = connection::spec(config, status.clone(), connection::DEFAULT_POLICY);
            ChildSpec::supervisor(format!("n-{i}"), Strategy::OneForOne, vec![connection])
        })
        .collect();
    let tree = Tree::start(specs, TreeOptions::default())
        .await
        .expect("node tree");
    let all_up = async || statuses.iter().all(|s| s.connected()).then_some(());
    eventually(Duration::from_secs(60), "all 100 nodes connected", all_up).await;

    // SIGTERM, and a new process on the same port as soon as the old one is gone.
    rig.warden.signal("-TERM");
    rig.warden.wait_exit(Duration::from_secs(20)).await;
    let went = eventually(
        Duration::from_secs(10),
        "the nodes saw the gateway go",
        async || statuses.iter().all(|s| !s.connected()).then_some(()),
    );
    went.await;
    let rig = scenario.start().await;
    let readyz = format!("{}/readyz", rig.admin);
    let http = reqwest::Client::new();
    let ready_at = eventually(Duration::from_secs(10), "/readyz answers 200", async || {
        let status = http.get(&readyz).send().await.ok()?.status();
        (status == 200).then(Instant::now)
    })
    .await;
    // When each node is back, polled every millisecond.
    let mut back: Vec<Option<Instant>> = vec![None; NODES];
    let give_up = Instant::now() + Duration::from_secs(30);
    while back.iter().any(Option::is_none) && Instant::now() < give_up {
        let now = Instant::now();
        for (at, status) in back.iter_mut().zip(&statuses) {
            if at.is_none() && status.connected() {
                *at = Some(now);
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let came_back = back.iter().flatten().count();
    assert_eq!(came_back, NODES, "not every node came back within 30 s");
    let mut after: Vec<Duration> = back
        .iter()
        .flatten()
        .map(|at| at.saturating_duration_since(ready_at))
        .collect();
    after.sort();
    let pick = |q: f64| after[((after.len() as f64 * q).ceil() as usize).clamp(1, after.len()) - 1];
    let (p50, p99, max) = (pick(0.5), pick(0.99), after[after.len() - 1]);
    let scraped = http
        .get(format!("{}/metrics", rig.admin))
        .send()
        .await
        .expect("/metrics");
    assert_eq!(scraped.status(), 200);
    let metrics = scraped.text().await.expect("metrics text");
    // The counters read below are this gateway's: it holds every node's session.
    let nodes = metrics
        .lines()
        .find(|l| l.starts_with("warden_gateway_sessions{") && l.contains("role=\"node\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert_eq!(nodes, Some(NODES as f64), "node sessions in /metrics");
    use warden_actors::gateway::metrics::{HANDSHAKE_TIMEOUTS_TOTAL, PREAUTH_REJECTIONS_TOTAL};
    let timeouts = metric(&metrics, HANDSHAKE_TIMEOUTS_TOTAL);
    let rejected = metric(&metrics, PREAUTH_REJECTIONS_TOTAL);
    eprintln!(
        "100 nodes back after the restarted gateway's /readyz: p50 {} ms, p99 {} ms, max {} ms; \
         {timeouts} handshake timeouts, {rejected} answered 503",
        p50.as_millis(),
        p99.as_millis(),
        max.as_millis()
    );
    assert_eq!((timeouts, rejected), (0.0, 0.0), "handshake timeouts, 503s");
    assert!(
        p99 <= Duration::from_millis(250),
        "p99 {p99:?} after /readyz"
    );
    let report = tree.shutdown(Duration::from_secs(10)).await;
    assert!(report.graceful, "{:?}", report.still_running);
}
