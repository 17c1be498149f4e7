//! Real-process tests of node mode: `warden node` processes connected to a `warden run`
//! gateway that is stopped, killed and restarted under them.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use warden_actors::gateway::client::{ConnectOptions, GatewayClient};
use warden_actors::gateway::protocol::{ClientInfo, Role};

use crate::process::{TempDir, Warden, poll_json};

const TOKEN: &str = "node-test-token";

/// A loopback port that was free a moment ago (the gateway must come back on the same one).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn gateway(name: &str, addr: &str) -> Warden {
    Warden::start(
        name,
        addr,
        &[
            ("WARDEN_GATEWAY__TOKEN", TOKEN),
            ("WARDEN_GATEWAY__ALLOW_UNLISTED_NODES", "true"),
        ],
    )
}

/// Starts `warden node` named `name` against `url`, with extra `[node]` lines.
fn node(name: &str, url: &str, token: &str, extra: &str) -> Warden {
    let dir = TempDir::new(name);
    let config = format!(
        r#"[node]
gateway_url = "{url}"
token = "{token}"
name = "{name}"
{extra}
[node.commands.hello]
argv = ["echo", "hello from {name}"]
[node.commands.slow]
argv = ["sleep", "5"]
"#
    );
    std::fs::write(dir.0.join("node.toml"), config).expect("config");
    let args = [
        "--config",
        "node.toml",
        "node",
        "--admin-bind",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ];
    Warden::spawn(dir, &args, &[])
}

/// Calls `method` as an operator.
async fn call(url: &str, method: &str, params: Value) -> Result<Value, String> {
    let options = ConnectOptions::new(
        Role::Operator,
        TOKEN,
        ClientInfo {
            name: "it".into(),
            version: "0".into(),
        },
    );
    let (mut client, _) = GatewayClient::connect(url, options)
        .await
        .map_err(|e| e.to_string())?;
    let result = client.call(method, params).await.map_err(|e| e.to_string());
    client.close().await;
    result
}

/// Names of the connected nodes, or none while the gateway is unreachable.
async fn connected(url: &str) -> Vec<String> {
    match call(url, "nodes.list", json!({})).await {
        Ok(Value::Array(nodes)) => nodes
            .iter()
            .filter(|n| n["connected"] == true)
            .filter_map(|n| n["name"].as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

/// Waits until `n` nodes are connected; returns when that was seen.
async fn until_connected(url: &str, n: usize, within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        let now = connected(url).await;
        if now.len() == n {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} nodes connected: {now:?}",
            now.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a gateway on `addr` and returns it with the instant its /readyz answered 200.
async fn gateway_ready(name: &str, addr: &str) -> (Warden, Instant) {
    let gw = gateway(name, addr);
    let admin = gw.admin().await;
    poll_json(
        &format!("{admin}/readyz"),
        Duration::from_secs(10),
        |s, _| s == 200,
    )
    .await;
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
        // The scenario: the gateway is down for 2 s.
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
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let err = call(
            &url,
            "nodes.invoke",
            json!({"node": "box1", "command": "hello"}),
        )
        .await
        .expect_err("offline");
        if err.contains("node_offline") {
            break;
        }
        assert!(Instant::now() < deadline, "never offline: {err}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
