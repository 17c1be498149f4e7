//! Integration tests: the gateway over real sockets.
//!
//! Each test starts the `gateway` subtree the way `warden run` does ([`gateway::spec`] under
//! a real [`Tree`]) with the listener on `127.0.0.1:0`, and speaks protocol v1 with a raw
//! tokio-tungstenite client — also to play a node. Every wait has a deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use warden_actors::gateway::client::{ConnectError, ConnectOptions, GatewayClient};
use warden_actors::gateway::protocol::{Role, close, parse_retry_after};
use warden_actors::gateway::{self, GatewaySettings, GatewayState};
use warden_actors::supervision::Tree;

use crate::support::{client_info, eventually, gateway_tree};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long any one step may take before a test fails.
const DEADLINE: Duration = Duration::from_secs(5);

const TOKEN: &str = "s3cret";

/// A running gateway subtree.
struct Gateway {
    tree: Tree,
    state: GatewayState,
    addr: SocketAddr,
}

impl Gateway {
    /// Starts the subtree; hands it its tree handle unless `starting` is wanted.
    async fn start(settings: GatewaySettings, set_tree: bool) -> Self {
        let state = GatewayState::new(settings);
        let (tree, addr) = gateway_tree(&state).await;
        if set_tree {
            assert!(state.set_tree(tree.handle()).is_ok());
        }
        Self { tree, state, addr }
    }

    async fn default() -> Self {
        Self::start(settings(), true).await
    }

    fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// A socket that has read its `connect.challenge`, opened without a credential on the
    /// upgrade (like a browser; held to 64 KiB frames).
    async fn open(&self) -> Ws {
        self.open_with(None).await
    }

    /// The same, showing `bearer` on the upgrade as warden's own clients do.
    async fn open_with(&self, bearer: Option<&str>) -> Ws {
        let mut request = self.url().into_client_request().expect("request");
        if let Some(token) = bearer {
            let value = HeaderValue::from_str(&format!("Bearer {token}")).expect("header");
            request.headers_mut().insert("authorization", value);
        }
        let (mut ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("upgrade");
        let challenge = next_frame(&mut ws).await;
        assert_eq!(challenge["type"], "event");
        assert_eq!(challenge["event"], "connect.challenge");
        assert!(
            challenge["payload"]["nonce"]
                .as_str()
                .is_some_and(|n| n.len() == 32)
        );
        assert!(challenge["payload"]["ts"].as_u64().is_some_and(|ts| ts > 0));
        ws
    }

    /// A socket past `hello-ok` as `role`; returns it and the hello payload.
    async fn hello(&self, role: &str, extra: Value) -> (Ws, Value) {
        self.hello_as(role, TOKEN, extra).await
    }

    /// A socket past `hello-ok` as `role` with credential `token`.
    async fn hello_as(&self, role: &str, token: &str, extra: Value) -> (Ws, Value) {
        let mut ws = self.open_with(Some(token)).await;
        send(&mut ws, &connect_req("c", role, token, extra)).await;
        let res = next_res(&mut ws, "c").await;
        assert_eq!(res["ok"], true, "{res}");
        (ws, res["payload"].clone())
    }

    async fn operator(&self) -> Ws {
        self.hello("operator", json!({})).await.0
    }

    async fn node(&self, name: &str, commands: &[&str]) -> Ws {
        let node = json!({ "node": { "name": name, "commands": commands } });
        self.hello("node", node).await.0
    }
}

/// `TOKEN` is operator `default`'s; nodes no config lists connect with it.
fn settings() -> GatewaySettings {
    GatewaySettings {
        bind: SocketAddr::from(([127, 0, 0, 1], 0)),
        token: Some(TOKEN.to_string()),
        allow_unlisted_nodes: true,
        ..GatewaySettings::default()
    }
}

fn connect_req(id: &str, role: &str, token: &str, extra: Value) -> Value {
    let mut params = json!({
        "protocol": 1,
        "role": role,
        "token": token,
        "client": { "name": "it", "version": "0" },
    });
    if let (Some(p), Some(extra)) = (params.as_object_mut(), extra.as_object()) {
        p.extend(extra.clone());
    }
    json!({ "type": "req", "id": id, "method": "connect", "params": params })
}

async fn send(ws: &mut Ws, frame: &Value) {
    ws.send(Message::text(frame.to_string()))
        .await
        .expect("send");
}

/// What the server sent next: a text frame, or how it closed.
enum Next {
    Frame(Value),
    Closed(Option<(u16, String)>),
}

async fn next(ws: &mut Ws) -> Next {
    loop {
        let msg = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("nothing from the server within the deadline");
        match msg {
            Some(Ok(Message::Text(t))) => {
                return Next::Frame(serde_json::from_str(t.as_str()).expect("JSON frame"));
            }
            Some(Ok(Message::Close(frame))) => {
                return Next::Closed(
                    frame.map(|f: CloseFrame| (u16::from(f.code), f.reason.to_string())),
                );
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("read failed: {e}"),
            None => return Next::Closed(None),
        }
    }
}

async fn next_frame(ws: &mut Ws) -> Value {
    match next(ws).await {
        Next::Frame(v) => v,
        Next::Closed(c) => panic!("closed while a frame was expected: {c:?}"),
    }
}

/// The `res` to request `id`, skipping events.
async fn next_res(ws: &mut Ws, id: &str) -> Value {
    loop {
        let frame = next_frame(ws).await;
        if frame["type"] == "res" && frame["id"] == id {
            return frame;
        }
        assert_eq!(frame["type"], "event", "unexpected frame {frame}");
    }
}

/// The next event other than `tick`.
async fn next_event(ws: &mut Ws) -> Value {
    loop {
        let frame = next_frame(ws).await;
        assert_eq!(frame["type"], "event", "unexpected frame {frame}");
        if frame["event"] != "tick" {
            return frame;
        }
    }
}

/// Skips frames until the close; returns its code and reason, and the frames before it.
async fn closed(ws: &mut Ws) -> ((u16, String), Vec<Value>) {
    let mut frames = Vec::new();
    loop {
        match next(ws).await {
            Next::Frame(v) => frames.push(v),
            Next::Closed(Some(c)) => return (c, frames),
            Next::Closed(None) => panic!("closed without a close frame after {frames:?}"),
        }
    }
}

async fn call(ws: &mut Ws, id: &str, method: &str, params: Value) -> Value {
    send(
        ws,
        &json!({ "type": "req", "id": id, "method": method, "params": params }),
    )
    .await;
    next_res(ws, id).await
}

fn error_code(res: &Value) -> &str {
    assert_eq!(res["ok"], false, "{res}");
    res["error"]["code"].as_str().expect("error code")
}

#[tokio::test]
async fn handshake_for_each_role() {
    let gw = Gateway::default().await;
    let (mut op, hello) = gw.hello("operator", json!({})).await;
    assert_eq!(hello["type"], "hello-ok");
    assert_eq!(hello["server"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(hello["policy"]["tick_interval_ms"], 30_000);
    assert_eq!(hello["policy"]["max_frame_bytes"], 1 << 20);
    let credential = gw.state.add_approver("nova");
    let (mut approver, _) = gw
        .hello_as(
            "approver",
            credential.expose(),
            json!({ "account": "nova" }),
        )
        .await;
    let mut node = gw.node("box", &["uptime"]).await;
    for ws in [&mut op, &mut approver, &mut node] {
        let res = call(ws, "h", "health", json!({})).await;
        assert_eq!(res["payload"], json!({ "status": "ok" }));
    }
    let status = call(&mut op, "s", "status", json!({})).await;
    let p = &status["payload"];
    assert_eq!(p["version"], env!("CARGO_PKG_VERSION"));
    assert!(p["uptime_ms"].as_u64().is_some());
    assert_eq!(
        p["sessions"],
        json!({ "operator": 1, "node": 1, "approver": 1, "handshaking": 0 })
    );
    // Operator-only methods are forbidden to the others.
    let res = call(&mut node, "t", "tree", json!({})).await;
    assert_eq!(error_code(&res), "forbidden");
    // The tree shows the sessions under root/gateway/sessions.
    let tree = call(&mut op, "t", "tree", json!({})).await;
    let gateway = &tree["payload"]["children"][0];
    assert_eq!(gateway["path"], "root/gateway");
    assert_eq!(gateway["children"][0]["path"], "root/gateway/listener");
    let sessions = &gateway["children"][1];
    assert_eq!(sessions["path"], "root/gateway/sessions");
    let kids = sessions["children"].as_array().expect("sessions");
    assert_eq!(kids.len(), 3, "{sessions}");
    assert!(
        kids.iter()
            .all(|k| k["kind"] == "gateway_session" && k["restart"] == "temporary")
    );
    // A role node without its node info is refused.
    let mut bad = gw.open().await;
    send(&mut bad, &connect_req("c", "node", TOKEN, json!({}))).await;
    let res = next_res(&mut bad, "c").await;
    assert_eq!(error_code(&res), "bad_request");
    assert_eq!(closed(&mut bad).await.0.0, close::POLICY);
}

#[tokio::test]
async fn wrong_token_is_unauthorized_then_1008() {
    let gw = Gateway::default().await;
    let mut ws = gw.open().await;
    send(&mut ws, &connect_req("c", "operator", "wrong", json!({}))).await;
    let res = next_res(&mut ws, "c").await;
    assert_eq!(error_code(&res), "unauthorized");
    let ((code, _), _) = closed(&mut ws).await;
    assert_eq!(code, close::POLICY);

    // A request before connect is refused the same way.
    let mut ws = gw.open().await;
    let res = call(&mut ws, "1", "health", json!({})).await;
    assert_eq!(error_code(&res), "unauthorized");
    assert_eq!(
        closed(&mut ws).await.0,
        (close::POLICY, "connect first".to_string())
    );
}

#[tokio::test]
async fn bad_protocol_version_is_refused() {
    let gw = Gateway::default().await;
    let mut ws = gw.open().await;
    let mut req = connect_req("c", "operator", TOKEN, json!({}));
    req["params"]["protocol"] = json!(2);
    send(&mut ws, &req).await;
    let res = next_res(&mut ws, "c").await;
    assert_eq!(error_code(&res), "bad_request");
    let message = res["error"]["message"].as_str().expect("message");
    assert!(message.contains("protocol version 2"), "{message}");
    assert_eq!(closed(&mut ws).await.0.0, close::POLICY);
}

#[tokio::test]
async fn slow_handshake_is_closed_with_4408_at_the_timeout() {
    let gw = Gateway::start(
        GatewaySettings {
            handshake_timeout_ms: 300,
            ..settings()
        },
        true,
    )
    .await;
    let t0 = Instant::now();
    let mut ws = gw.open().await;
    let ((code, reason), _) = closed(&mut ws).await;
    let waited = t0.elapsed();
    assert_eq!(
        (code, reason.as_str()),
        (close::HANDSHAKE_TIMEOUT, "handshake timeout")
    );
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    eventually(DEADLINE, "the pre-auth slot is released", async || {
        gw.state.counts().3 == 0
    })
    .await;
}

#[tokio::test]
async fn handshake_storm_from_one_ip_gets_503_beyond_the_limit() {
    let gw = Gateway::default().await;
    let mut op = gw.operator().await;
    let attempts = (0..40).map(|_| tokio_tungstenite::connect_async(gw.url()));
    let results = futures_util::future::join_all(attempts).await;
    let mut open = Vec::new();
    let mut refused = 0;
    for result in results {
        match result {
            Ok((ws, _)) => open.push(ws),
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 503);
                let retry = response.headers().get("retry-after").expect("Retry-After");
                assert_eq!(retry, "1");
                let body: Value =
                    serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                        .expect("JSON body");
                assert_eq!(body["error"]["code"], "too_many_handshakes");
                refused += 1;
            }
            Err(e) => panic!("unexpected connect error: {e}"),
        }
    }
    assert_eq!((open.len(), refused), (32, 8));
    // The authenticated client is unaffected.
    let res = call(&mut op, "h", "health", json!({})).await;
    assert_eq!(res["ok"], true);
    let status = call(&mut op, "s", "status", json!({})).await;
    assert_eq!(status["payload"]["sessions"]["handshaking"], 32);
    // Slots come back when the sockets go.
    drop(open);
    eventually(DEADLINE, "every pre-auth slot is released", async || {
        gw.state.counts().3 == 0
    })
    .await;
    let _ = gw.open().await;
}

#[tokio::test]
async fn oversize_frames_are_closed_with_1009() {
    let max = 128 * 1024;
    let gw = Gateway::start(
        GatewaySettings {
            max_frame_bytes: max,
            ..settings()
        },
        true,
    )
    .await;
    // Before hello: over 64 KiB, though under max_frame_bytes.
    let mut ws = gw.open().await;
    send(&mut ws, &json!({ "pad": "x".repeat(70 * 1024) })).await;
    assert_eq!(closed(&mut ws).await.0.0, close::TOO_BIG);
    // After hello: 100 KiB is fine, over max_frame_bytes is not.
    let mut ws = gw.operator().await;
    let res = call(
        &mut ws,
        "1",
        "health",
        json!({ "pad": "x".repeat(100 * 1024) }),
    )
    .await;
    assert_eq!(res["ok"], true);
    send(&mut ws, &json!({ "pad": "x".repeat(max + 1) })).await;
    assert_eq!(closed(&mut ws).await.0.0, close::TOO_BIG);
    // A socket that did not show its credential on the upgrade stays at 64 KiB, and its
    // hello says so.
    let mut ws = gw.open().await;
    send(&mut ws, &connect_req("c", "operator", TOKEN, json!({}))).await;
    let hello = next_res(&mut ws, "c").await;
    assert_eq!(hello["payload"]["policy"]["max_frame_bytes"], 64 * 1024);
    send(&mut ws, &json!({ "pad": "x".repeat(70 * 1024) })).await;
    assert_eq!(closed(&mut ws).await.0.0, close::TOO_BIG);
}

#[tokio::test]
async fn malformed_frames_are_closed_with_1007() {
    let gw = Gateway::default().await;
    let mut ws = gw.open().await;
    ws.send(Message::text("{not json")).await.expect("send");
    assert_eq!(closed(&mut ws).await.0.0, close::INVALID_FRAME);
    let mut ws = gw.operator().await;
    send(&mut ws, &json!({ "type": "frob", "id": "1" })).await;
    assert_eq!(closed(&mut ws).await.0.0, close::INVALID_FRAME);
    let mut ws = gw.operator().await;
    ws.send(Message::binary(vec![1, 2, 3])).await.expect("send");
    assert_eq!(closed(&mut ws).await.0.0, close::INVALID_FRAME);
}

#[tokio::test]
async fn unknown_method_is_an_error_and_the_session_goes_on() {
    let gw = Gateway::default().await;
    let mut ws = gw.operator().await;
    let res = call(&mut ws, "1", "frobnicate", json!({})).await;
    assert_eq!(error_code(&res), "unknown_method");
    let res = call(&mut ws, "2", "approvals.list", json!({})).await;
    assert_eq!(error_code(&res), "not_implemented");
    let res = call(&mut ws, "3", "connect", json!({})).await;
    assert_eq!(error_code(&res), "bad_request");
    let res = call(&mut ws, "4", "health", json!({})).await;
    assert_eq!(res["ok"], true);
}

#[tokio::test]
async fn before_the_tree_is_set_sockets_get_1013_with_retry_after() {
    let gw = Gateway::start(settings(), false).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(gw.url())
        .await
        .expect("upgrade");
    let ((code, reason), frames) = closed(&mut ws).await;
    assert!(frames.is_empty(), "{frames:?}");
    assert_eq!(code, close::TRY_AGAIN);
    assert!(
        parse_retry_after(&reason).is_some_and(|ms| ms > 0),
        "{reason}"
    );
    eventually(DEADLINE, "the pre-auth slot is released", async || {
        gw.state.counts().3 == 0
    })
    .await;
}

#[tokio::test]
async fn a_socket_that_arrives_just_before_the_tree_is_set_waits_for_it() {
    let gw = Gateway::start(settings(), false).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(gw.url())
        .await
        .expect("upgrade");
    // Set while the socket waits (the wait is STARTING_WAIT, 2 s): it gets a session.
    eventually(
        DEADLINE,
        "the socket waits, holding a pre-auth slot",
        async || gw.state.counts().3 == 1,
    )
    .await;
    assert!(gw.state.set_tree(gw.tree.handle()).is_ok());
    let challenge = next_event(&mut ws).await;
    assert_eq!(challenge["event"], "connect.challenge", "{challenge}");
}

#[tokio::test]
async fn shutdown_tells_every_socket_1012() {
    let gw = Gateway::default().await;
    let mut op = gw.operator().await;
    let mut handshaking = gw.open().await;
    let (report, (op_close, op_frames), (hs_close, hs_frames)) = tokio::join!(
        gw.tree.shutdown(Duration::from_secs(10)),
        closed(&mut op),
        closed(&mut handshaking),
    );
    assert!(report.graceful, "{report:?}");
    assert_eq!(op_close, (close::RESTART, "service restart".to_string()));
    let shutdown = op_frames.last().expect("a shutdown event");
    assert_eq!(shutdown["event"], "shutdown");
    assert_eq!(
        shutdown["payload"],
        json!({ "restart": true, "expected_back_ms": 1000 })
    );
    assert_eq!(hs_close.0, close::RESTART);
    assert!(hs_frames.is_empty(), "{hs_frames:?}");
    // The listener stopped after the sessions.
    assert!(tokio_tungstenite::connect_async(gw.url()).await.is_err());
}

/// The program announces the shutdown before it stops the tree: every socket is told at
/// once, without waiting for the kernel to stop the sessions one by one.
#[tokio::test]
async fn an_announced_final_stop_closes_every_socket_with_1001_at_once() {
    let gw = Gateway::default().await;
    let mut op = gw.operator().await;
    let mut handshaking = gw.open().await;
    gw.state.set_shutdown_intent(gateway::ShutdownIntent::Stop);
    let ((code, reason), frames) = closed(&mut op).await;
    assert_eq!(
        (code, reason.as_str()),
        (close::GOING_AWAY, "server stopping")
    );
    let notice = frames.last().expect("a shutdown event");
    assert_eq!(notice["event"], "shutdown");
    assert_eq!(
        notice["payload"],
        json!({ "restart": false, "expected_back_ms": 0 })
    );
    assert_eq!(closed(&mut handshaking).await.0.0, close::GOING_AWAY);
    eventually(DEADLINE, "the sessions are gone", async || {
        gw.state.counts() == (0, 0, 0, 0)
    })
    .await;
    let report = gw.tree.shutdown(Duration::from_secs(10)).await;
    assert!(report.graceful, "{report:?}");
}

#[tokio::test]
async fn a_silent_client_is_closed_with_4000_after_two_ticks() {
    let gw = Gateway::start(
        GatewaySettings {
            tick_interval_ms: 200,
            ..settings()
        },
        true,
    )
    .await;
    let mut ws = gw.operator().await;
    // Not reading means not answering pings: the client sends nothing.
    let t0 = Instant::now();
    eventually(DEADLINE, "the silent session ends", async || {
        gw.state.counts().0 == 0
    })
    .await;
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t0.elapsed()
    );
    let ((code, reason), frames) = closed(&mut ws).await;
    assert_eq!(
        (code, reason.as_str()),
        (close::NO_TICK, "no frame for 2 ticks")
    );
    assert!(frames.iter().any(|f| f["event"] == "tick"), "{frames:?}");
    assert!(t0.elapsed() < Duration::from_secs(3));
}

/// Answers the next `node.invoke` the fake node receives with `answer(params)`.
async fn answer_invoke(node: &mut Ws, answer: impl FnOnce(&Value) -> Value) -> Value {
    let req = next_event_or_req(node).await;
    assert_eq!(req["method"], "node.invoke", "{req}");
    let id = req["id"].as_str().expect("id").to_string();
    let mut res = answer(&req["params"]);
    res["type"] = json!("res");
    res["id"] = json!(id);
    send(node, &res).await;
    req["params"].clone()
}

async fn next_event_or_req(ws: &mut Ws) -> Value {
    loop {
        let frame = next_frame(ws).await;
        if frame["type"] == "req" {
            return frame;
        }
    }
}

#[tokio::test]
async fn node_registry_list_events_and_invoke() {
    let gw = Gateway::default().await;
    let mut op = gw.operator().await;
    let sub = call(
        &mut op,
        "sub",
        "subscribe",
        json!({ "events": ["node.connected", "node.disconnected"] }),
    )
    .await;
    assert_eq!(
        sub["payload"]["events"],
        json!(["node.connected", "node.disconnected"])
    );

    let res = call(
        &mut op,
        "0",
        "nodes.invoke",
        json!({ "node": "box", "command": "uptime" }),
    )
    .await;
    assert_eq!(error_code(&res), "unknown_node");

    let mut node = gw.node("box", &["uptime", "slow"]).await;
    let ev = next_event(&mut op).await;
    assert_eq!(ev["event"], "node.connected");
    assert_eq!(
        ev["payload"],
        json!({ "name": "box", "commands": ["uptime", "slow"], "approval_required": [] })
    );

    let list = call(&mut op, "l", "nodes.list", json!({})).await;
    let entries = list["payload"].as_array().expect("list");
    assert_eq!(entries.len(), 1, "{list}");
    assert_eq!(entries[0]["name"], "box");
    assert_eq!(entries[0]["commands"], json!(["uptime", "slow"]));
    assert_eq!(entries[0]["connected"], true);
    assert!(entries[0]["connected_at"].as_u64().is_some());
    assert!(entries[0]["last_seen"].as_u64().is_some());

    // A round trip: the node gets node.invoke and its answer comes back.
    let invoke = json!({ "node": "box", "command": "uptime", "args": ["-p"] });
    send(
        &mut op,
        &json!({ "type": "req", "id": "1", "method": "nodes.invoke", "params": invoke }),
    )
    .await;
    let params = answer_invoke(
        &mut node,
        |_| json!({ "ok": true, "payload": { "stdout": "up 3 days" } }),
    )
    .await;
    assert_eq!(params, json!({ "command": "uptime", "args": ["-p"] }));
    let res = next_res(&mut op, "1").await;
    assert_eq!(res["payload"], json!({ "stdout": "up 3 days" }));

    // The node's errors are relayed as they are.
    send(
        &mut op,
        &json!({ "type": "req", "id": "2", "method": "nodes.invoke",
        "params": { "node": "box", "command": "uptime" } }),
    )
    .await;
    answer_invoke(
        &mut node,
        |_| json!({ "ok": false, "error": { "code": "exit_status", "message": "exit 1" } }),
    )
    .await;
    let res = next_res(&mut op, "2").await;
    assert_eq!(error_code(&res), "exit_status");

    let res = call(
        &mut op,
        "3",
        "nodes.invoke",
        json!({ "node": "box", "command": "rm" }),
    )
    .await;
    assert_eq!(error_code(&res), "unknown_command");

    // No answer within timeout_ms.
    let t0 = Instant::now();
    let res = call(
        &mut op,
        "4",
        "nodes.invoke",
        json!({ "node": "box", "command": "slow", "timeout_ms": 200 }),
    )
    .await;
    assert_eq!(error_code(&res), "timeout");
    assert!(t0.elapsed() >= Duration::from_millis(200));
    let seen = next_event_or_req(&mut node).await;
    assert_eq!(seen["params"]["command"], "slow");

    // The node leaves: the event, then node_offline.
    node.close(None).await.expect("close");
    let ev = next_event(&mut op).await;
    assert_eq!(
        ev,
        json!({ "type": "event", "event": "node.disconnected", "payload": { "name": "box" } })
    );
    let res = call(
        &mut op,
        "5",
        "nodes.invoke",
        json!({ "node": "box", "command": "uptime" }),
    )
    .await;
    assert_eq!(error_code(&res), "node_offline");
    let list = call(&mut op, "l2", "nodes.list", json!({})).await;
    assert_eq!(list["payload"][0]["connected"], false);
    assert!(list["payload"][0].get("connected_at").is_none(), "{list}");
}

#[tokio::test]
async fn a_node_reconnecting_under_its_name_replaces_the_old_session() {
    let gw = Gateway::default().await;
    let mut op = gw.operator().await;
    let mut old = gw.node("box", &["uptime"]).await;
    let mut new = gw.node("box", &["uptime", "df"]).await;
    let ((code, reason), _) = closed(&mut old).await;
    assert_eq!(
        (code, reason.as_str()),
        (close::POLICY, "replaced by a new connection")
    );
    drop(old);
    eventually(DEADLINE, "one node session is left", async || {
        gw.state.counts().1 == 1
    })
    .await;
    let list = call(&mut op, "l", "nodes.list", json!({})).await;
    let entries = list["payload"].as_array().expect("list");
    assert_eq!(entries.len(), 1, "{list}");
    assert_eq!(entries[0]["connected"], true);
    assert_eq!(entries[0]["commands"], json!(["uptime", "df"]));
    // Calls go to the new session.
    send(
        &mut op,
        &json!({ "type": "req", "id": "1", "method": "nodes.invoke",
        "params": { "node": "box", "command": "df" } }),
    )
    .await;
    answer_invoke(&mut new, |_| json!({ "ok": true, "payload": "fine" })).await;
    assert_eq!(next_res(&mut op, "1").await["payload"], "fine");
}

/// Credentials of the principals test.
const OPS: &str = "ops-token";
const BOX: &str = "box-token";

fn principal_settings() -> GatewaySettings {
    let credential = |t: &str| gateway::Credential {
        token: Some(t.to_string()),
        token_file: None,
    };
    GatewaySettings {
        bind: SocketAddr::from(([127, 0, 0, 1], 0)),
        operators: [("ops".to_string(), credential(OPS))].into(),
        nodes: [("box".to_string(), credential(BOX))].into(),
        ..GatewaySettings::default()
    }
}

/// Connects with `token` as `role`; the refusal's error code, after which the server
/// closed with 1008.
async fn refused(gw: &Gateway, role: &str, token: &str, extra: Value) -> String {
    let mut ws = gw.open().await;
    send(&mut ws, &connect_req("c", role, token, extra)).await;
    let res = next_res(&mut ws, "c").await;
    let code = error_code(&res).to_string();
    assert_eq!(closed(&mut ws).await.0.0, close::POLICY, "{res}");
    code
}

/// The role comes from the credential: an operator's token cannot act as an approval
/// handler (the self-approval attack) nor take a configured node's name; a node's token is
/// good for that node only; an unlisted node is refused by default.
#[tokio::test]
async fn a_credential_admits_only_its_own_principal() {
    let gw = Gateway::start(principal_settings(), true).await;
    let nova = json!({ "account": "nova" });
    // Self-approval: no external credential holds role approver.
    for token in [OPS, BOX, "guess"] {
        assert_eq!(
            refused(&gw, "approver", token, nova.clone()).await,
            "unauthorized"
        );
    }
    let handler = gw.state.add_approver("nova");
    // A handler's credential serves its own account only.
    let other = json!({ "account": "other" });
    assert_eq!(
        refused(&gw, "approver", handler.expose(), other).await,
        "unauthorized"
    );
    let box_node = json!({ "node": { "name": "box", "commands": ["uptime"] } });
    for (role, token, extra) in [
        ("operator", BOX, json!({})),
        ("operator", handler.expose(), json!({})),
        ("node", OPS, box_node.clone()),
        (
            "node",
            BOX,
            json!({ "node": { "name": "other", "commands": [] } }),
        ),
        (
            "node",
            OPS,
            json!({ "node": { "name": "laptop", "commands": [] } }),
        ),
    ] {
        assert_eq!(
            refused(&gw, role, token, extra.clone()).await,
            "unauthorized",
            "{role} with {token} {extra}"
        );
    }
    eventually(DEADLINE, "every refused socket is gone", async || {
        gw.state.counts() == (0, 0, 0, 0)
    })
    .await;
    let (_op, _) = gw.hello_as("operator", OPS, json!({})).await;
    let (_node, _) = gw.hello_as("node", BOX, box_node).await;
    let (_approver, _) = gw.hello_as("approver", handler.expose(), nova).await;
    assert_eq!(gw.state.counts(), (1, 1, 1, 0));
}

/// The node-name takeover attack: a second connection naming a live node with another
/// credential is refused and every call still reaches the real node.
#[tokio::test]
async fn a_live_node_name_cannot_be_taken_over() {
    let mut settings = principal_settings();
    settings.allow_unlisted_nodes = true;
    let gw = Gateway::start(settings, true).await;
    let (mut op, _) = gw.hello_as("operator", OPS, json!({})).await;
    let laptop = json!({ "node": { "name": "laptop", "commands": ["uptime"] } });
    let (mut real, _) = gw.hello_as("node", OPS, laptop.clone()).await;
    // The configured node's credential may not claim `laptop`, nor an operator's `box`.
    let (mut real_box, _) = gw
        .hello_as(
            "node",
            BOX,
            json!({ "node": { "name": "box", "commands": ["uptime"] } }),
        )
        .await;
    let impostor = json!({ "node": { "name": "box", "commands": ["uptime"] } });
    assert_eq!(refused(&gw, "node", OPS, impostor).await, "unauthorized");
    assert_eq!(refused(&gw, "node", BOX, laptop).await, "unauthorized");
    // Every call still reaches the real nodes.
    for i in 0..20 {
        let (name, node) = if i % 2 == 0 {
            ("box", &mut real_box)
        } else {
            ("laptop", &mut real)
        };
        let id = format!("i{i}");
        send(
            &mut op,
            &json!({ "type": "req", "id": id, "method": "nodes.invoke",
                "params": { "node": name, "command": "uptime" } }),
        )
        .await;
        answer_invoke(node, |_| json!({ "ok": true, "payload": name })).await;
        assert_eq!(next_res(&mut op, &id).await["payload"], name);
    }
    // The node itself reconnecting (same credential) replaces its old session.
    let (_again, _) = gw
        .hello_as(
            "node",
            BOX,
            json!({ "node": { "name": "box", "commands": ["uptime"] } }),
        )
        .await;
    let ((code, reason), _) = closed(&mut real_box).await;
    assert_eq!(
        (code, reason.as_str()),
        (close::POLICY, "replaced by a new connection")
    );
}

/// A command the node marks `approval` is refused to `nodes.invoke`; an operator cannot
/// smuggle a grant in; `nodes.list` shows the flag.
#[tokio::test]
async fn approval_gated_commands_are_refused_to_nodes_invoke() {
    let gw = Gateway::start(principal_settings(), true).await;
    let (mut op, _) = gw.hello_as("operator", OPS, json!({})).await;
    let commands = json!(["uptime", { "name": "disk", "approval": true }]);
    let (mut node, _) = gw
        .hello_as(
            "node",
            BOX,
            json!({ "node": { "name": "box", "commands": commands } }),
        )
        .await;
    let res = call(
        &mut op,
        "1",
        "nodes.invoke",
        json!({ "node": "box", "command": "disk", "args": ["-h"] }),
    )
    .await;
    assert_eq!(error_code(&res), "approval_required", "{res}");
    assert!(
        res["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("approvals.request")),
        "{res}"
    );
    let grant = json!({ "approval": "abcd1234", "expires_at_ms": 1, "nonce": "00", "mac": "00" });
    let res = call(
        &mut op,
        "2",
        "nodes.invoke",
        json!({ "node": "box", "command": "disk", "grant": grant }),
    )
    .await;
    assert_eq!(error_code(&res), "bad_request", "{res}");
    let list = call(&mut op, "3", "nodes.list", json!({})).await;
    assert_eq!(list["payload"][0]["approval_required"], json!(["disk"]));
    // The ungated command still runs, without a grant.
    send(
        &mut op,
        &json!({ "type": "req", "id": "4", "method": "nodes.invoke",
            "params": { "node": "box", "command": "uptime" } }),
    )
    .await;
    let req = answer_invoke(&mut node, |_| json!({ "ok": true, "payload": "up" })).await;
    assert!(req.get("grant").is_none(), "{req}");
    assert_eq!(next_res(&mut op, "4").await["payload"], "up");
}

/// Per-session caps answer named errors: subscriptions, `timeout_ms`, open invocations.
#[tokio::test]
async fn session_caps_answer_named_errors() {
    let settings = GatewaySettings {
        max_subscriptions: 3,
        max_pending_invocations: 2,
        max_invoke_timeout_ms: 1000,
        ..settings()
    };
    let gw = Gateway::start(settings, true).await;
    let mut op = gw.operator().await;
    let mut node = gw.node("box", &["uptime"]).await;
    let res = call(
        &mut op,
        "s1",
        "subscribe",
        json!({ "events": ["a", "b", "c"] }),
    )
    .await;
    assert_eq!(res["ok"], true, "{res}");
    let res = call(&mut op, "s2", "subscribe", json!({ "events": ["d"] })).await;
    assert_eq!(error_code(&res), "too_large", "{res}");
    // Names are short too: one session cannot park megabytes in its subscriptions.
    let long = "x".repeat(65);
    let res = call(&mut op, "s3", "subscribe", json!({ "events": [long] })).await;
    assert_eq!(error_code(&res), "too_large", "{res}");
    let res = call(
        &mut op,
        "t",
        "nodes.invoke",
        json!({ "node": "box", "command": "uptime", "timeout_ms": 1001 }),
    )
    .await;
    assert_eq!(error_code(&res), "bad_request", "{res}");
    for id in ["p1", "p2"] {
        send(
            &mut op,
            &json!({ "type": "req", "id": id, "method": "nodes.invoke",
                "params": { "node": "box", "command": "uptime" } }),
        )
        .await;
    }
    let res = call(
        &mut op,
        "p3",
        "nodes.invoke",
        json!({ "node": "box", "command": "uptime" }),
    )
    .await;
    assert_eq!(error_code(&res), "busy", "{res}");
    assert!(
        res["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_pending_invocations")),
        "{res}"
    );
    // Answering one frees a place.
    answer_invoke(&mut node, |_| json!({ "ok": true, "payload": 1 })).await;
    assert_eq!(next_res(&mut op, "p1").await["ok"], true);
}

// ---------------------------------------------------------------------------------------
// The HTTP layer: header read timeout, pre-auth from accept, Origin, the connection cap
// ---------------------------------------------------------------------------------------

fn operator_options(token: &str) -> ConnectOptions {
    ConnectOptions::new(Role::Operator, token, client_info())
}

/// A raw WebSocket upgrade of `/ws` carrying `headers`.
async fn upgrade_with(gw: &Gateway, headers: &[(&str, &str)]) -> Result<Ws, tungstenite::Error> {
    let mut request = gw.url().into_client_request().expect("request");
    for (name, value) in headers {
        request.headers_mut().insert(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(ws, _)| ws)
}

/// The HTTP answer that refused an upgrade: status, `Retry-After`, JSON body.
fn refusal(result: Result<Ws, tungstenite::Error>) -> (u16, Option<String>, Value) {
    match result {
        Err(tungstenite::Error::Http(response)) => {
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                .expect("JSON body");
            (response.status().as_u16(), retry_after, body)
        }
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, got an upgrade"),
    }
}

/// Sends `request` on a new connection and reads until the server closes it.
async fn raw_http(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .expect("the server closed the connection within the deadline")
        .expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

const GET_HEALTH: &str = "GET /health HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n";

#[tokio::test]
async fn trickling_sockets_are_closed_at_the_header_read_timeout_while_a_client_is_served() {
    const SOCKETS: usize = 200;
    const PACE: Duration = Duration::from_millis(300);
    let timeout = Duration::from_millis(1000);
    let gw = Gateway::start(
        GatewaySettings {
            header_read_timeout_ms: 1000,
            // Room for the 200 tricklers and the client under the address's cap on
            // unauthenticated connections (4 × 64): this test is about the timeout.
            max_preauth_per_ip: 64,
            ..settings()
        },
        true,
    )
    .await;
    let connected = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let mut tricklers = JoinSet::new();
    for _ in 0..SOCKETS {
        let (addr, connected, closed) = (gw.addr, connected.clone(), closed.clone());
        tricklers.spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let t0 = Instant::now();
            connected.fetch_add(1, Ordering::SeqCst);
            // One byte of a request head every PACE; it would take seconds to complete.
            let head = b"GET /ws HTTP/1.1\r\nHost: gateway\r\nConnection: Upgrade\r\n";
            let mut pace = tokio::time::interval(PACE);
            let mut sent = 0;
            let mut sink = [0u8; 512];
            let lasted = loop {
                assert!(
                    t0.elapsed() < DEADLINE,
                    "still open after {DEADLINE:?} and {sent} bytes"
                );
                tokio::select! {
                    _ = pace.tick() => {
                        if stream.write_all(&head[sent % head.len()..][..1]).await.is_err() {
                            break t0.elapsed();
                        }
                        sent += 1;
                    }
                    read = stream.read(&mut sink) => match read {
                        Ok(0) | Err(_) => break t0.elapsed(),
                        Ok(_) => {}
                    },
                }
            };
            closed.fetch_add(1, Ordering::SeqCst);
            (lasted, sent)
        });
    }
    eventually(
        DEADLINE,
        "every trickling socket is connected",
        async || connected.load(Ordering::SeqCst) == SOCKETS,
    )
    .await;

    // Meanwhile a real client connects and is served (its credential spares it the
    // address's pre-auth budget, which the tricklers hold).
    let t = Instant::now();
    let (mut client, _) = GatewayClient::connect(&gw.url(), operator_options(TOKEN))
        .await
        .expect("hello-ok while 200 sockets trickle");
    let health = client.call("health", json!({})).await.expect("health");
    assert_eq!(health, json!({ "status": "ok" }));
    let served_in = t.elapsed();
    assert_eq!(
        closed.load(Ordering::SeqCst),
        0,
        "the client was served before any trickling socket was closed"
    );

    let mut lasted = Vec::new();
    while let Some(joined) = tricklers.join_next().await {
        let (time, sent) = joined.expect("trickler");
        assert!(sent >= 3, "a trickler sent only {sent} bytes");
        lasted.push(time);
    }
    lasted.sort();
    let (first, last) = (lasted[0], lasted[SOCKETS - 1]);
    eprintln!(
        "{SOCKETS} trickling sockets closed after {} to {} ms (header read timeout {} ms); \
         the client was served in {} ms",
        first.as_millis(),
        last.as_millis(),
        timeout.as_millis(),
        served_in.as_millis()
    );
    assert!(first >= timeout - Duration::from_millis(100), "{first:?}");
    assert!(last < timeout + Duration::from_millis(1500), "{last:?}");
    eventually(
        DEADLINE,
        "the tricklers' pre-auth slots are released",
        async || gw.state.counts().3 == 0,
    )
    .await;
    let health = client
        .call("health", json!({}))
        .await
        .expect("still served");
    assert_eq!(health, json!({ "status": "ok" }));
}

#[tokio::test]
async fn silent_sockets_do_not_lock_out_a_client_that_sends_its_credential() {
    let gw = Gateway::default().await;
    // 16 connections that never send a byte take slots from accept on; 16 upgraded sockets
    // that never send `connect` take the rest of the address's 32.
    let mut bare = Vec::new();
    for _ in 0..16 {
        bare.push(TcpStream::connect(gw.addr).await.expect("connect"));
    }
    eventually(
        DEADLINE,
        "silent connections hold slots from accept",
        async || gw.state.counts().3 == 16,
    )
    .await;
    let mut silent = Vec::new();
    for _ in 0..16 {
        silent.push(gw.open().await);
    }
    assert_eq!(gw.state.counts().3, 32);

    // Without a credential: 503, as before.
    let (status, retry_after, body) = refusal(upgrade_with(&gw, &[]).await);
    assert_eq!((status, retry_after.as_deref()), (503, Some("1")), "{body}");
    assert_eq!(body["error"]["code"], "too_many_handshakes");
    // A credential the gateway does not know: 401, no upgrade.
    let (status, _, body) =
        refusal(upgrade_with(&gw, &[("authorization", "Bearer not-the-token")]).await);
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        body,
        json!({ "error": { "code": "unauthorized", "message": "wrong token" } })
    );
    match GatewayClient::connect(&gw.url(), operator_options("not-the-token")).await {
        Err(ConnectError::Rejected { code, message }) => {
            assert_eq!(
                (code.as_str(), message.as_str()),
                ("unauthorized", "wrong token")
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }

    // With its credential on the upgrade, the real client gets in.
    let (mut client, _) = GatewayClient::connect(&gw.url(), operator_options(TOKEN))
        .await
        .expect("hello-ok despite 32 silent sockets");
    let status = client.call("status", json!({})).await.expect("status");
    assert_eq!(
        status["sessions"],
        json!({ "operator": 1, "node": 0, "approver": 0, "handshaking": 32 })
    );
    assert_eq!(gw.state.handshake_stats().preauth_rejections, 1);

    // The bare connections give their slots back when they close.
    drop(bare);
    eventually(
        DEADLINE,
        "the bare connections' slots are released",
        async || gw.state.counts().3 == 16,
    )
    .await;
    drop(silent);
}

#[tokio::test]
async fn an_upgrade_from_a_foreign_origin_gets_403_and_a_listed_one_upgrades() {
    let gw = Gateway::start(
        GatewaySettings {
            allowed_origins: vec!["https://ops.example.com".to_string()],
            ..settings()
        },
        true,
    )
    .await;
    let (status, _, body) = refusal(upgrade_with(&gw, &[("origin", "https://evil.example")]).await);
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "forbidden_origin");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("\"https://evil.example\""), "{message}");
    // Even with the right credential.
    let (status, _, _) = refusal(
        upgrade_with(
            &gw,
            &[
                ("origin", "http://localhost:3000"),
                ("authorization", &format!("Bearer {TOKEN}")),
            ],
        )
        .await,
    );
    assert_eq!(status, 403);

    // A listed origin (scheme and host compared without case) upgrades and handshakes.
    let mut ws = upgrade_with(&gw, &[("origin", "HTTPS://Ops.Example.com")])
        .await
        .expect("upgrade from a listed origin");
    assert_eq!(next_event(&mut ws).await["event"], "connect.challenge");
    send(&mut ws, &connect_req("c", "operator", TOKEN, json!({}))).await;
    assert_eq!(next_res(&mut ws, "c").await["ok"], true);
}

#[tokio::test]
async fn past_max_connections_a_new_connection_gets_503_with_retry_after() {
    let gw = Gateway::start(
        GatewaySettings {
            max_connections: 2,
            ..settings()
        },
        true,
    )
    .await;
    // An upgraded, authenticated socket and an idle connection: the cap of 2.
    let (client, _) = GatewayClient::connect(&gw.url(), operator_options(TOKEN))
        .await
        .expect("hello-ok");
    let _idle = TcpStream::connect(gw.addr).await.expect("connect");

    let answer = raw_http(gw.addr, GET_HEALTH).await;
    let message = answered_503(&answer, "too_many_connections");
    assert!(message.contains("maximum of 2 connections"), "{message}");

    // The WebSocket held its place until it closed; then a new connection is served.
    client.close().await;
    eventually(DEADLINE, "a new connection is served", async || {
        let answer = raw_http(gw.addr, GET_HEALTH).await;
        if answer.starts_with("HTTP/1.1 200 ") {
            return Ok(());
        }
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        Err(format!("still refused: {answer}"))
    })
    .await;
}

/// Reads what the server sends until it closes the connection; a reset ends it too (a
/// refusal written without lingering). Fails if the server keeps it open past the deadline.
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .expect("the server closed the connection within the deadline");
    String::from_utf8_lossy(&answer).into_owned()
}

/// A keep-alive `GET /health` (no `Connection: close`).
const GET_HEALTH_KEEP_ALIVE: &str = "GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n";

#[tokio::test]
async fn a_plain_health_connection_is_closed_after_its_answer() {
    let gw = Gateway::default().await;
    let answer = raw_http(gw.addr, GET_HEALTH_KEEP_ALIVE).await;
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(
        head.lines()
            .any(|l| l.eq_ignore_ascii_case("connection: close")),
        "{answer}"
    );
    assert_eq!(
        serde_json::from_str::<Value>(body).expect("JSON"),
        json!({ "status": "ok" })
    );
}

#[tokio::test]
async fn keep_alive_health_connections_from_one_address_cannot_lock_out_a_client_with_its_token() {
    const SOCKETS: usize = 200;
    let gw = Gateway::start(
        GatewaySettings {
            max_connections: 150,
            max_preauth_per_ip: 8,
            ..settings()
        },
        true,
    )
    .await;
    // The attack of the review: many keep-alive `GET /health` connections from 127.0.0.1,
    // all open at once and kept open on the client's side.
    let mut attack = Vec::new();
    for _ in 0..SOCKETS {
        attack.push(TcpStream::connect(gw.addr).await.expect("connect"));
    }
    // The address may hold 4 × 8 unauthenticated connections: the rest are refused at
    // accept, before they send anything.
    let (held, past) = attack.split_at_mut(32);
    let mut reset = 0;
    for stream in past.iter_mut() {
        let answer = read_until_closed(stream).await;
        if answer.is_empty() {
            reset += 1;
            continue;
        }
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        assert!(answer.contains("\r\nRetry-After: 1\r\n"), "{answer}");
        assert!(
            answer.contains("\"too_many_connections_from_address\""),
            "{answer}"
        );
        assert!(answer.contains("maximum of 32 unauthenticated"), "{answer}");
    }
    // The held ones send their keep-alive request; each is answered and closed.
    for stream in held.iter_mut() {
        stream
            .write_all(GET_HEALTH_KEEP_ALIVE.as_bytes())
            .await
            .expect("write");
    }
    for stream in held.iter_mut() {
        let answer = read_until_closed(stream).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{answer}"
        );
    }
    eprintln!(
        "{SOCKETS} keep-alive /health connections: 32 held, answered and closed; {} refused \
         at accept with 503 ({reset} of them reset)",
        SOCKETS - 32
    );

    // With the attacker's sockets still open on its side, the operator gets in.
    let mut client = eventually(DEADLINE, "hello-ok", async || {
        match GatewayClient::connect(&gw.url(), operator_options(TOKEN)).await {
            Ok((client, _)) => Ok(client),
            // The last closes may still be under way.
            Err(e @ ConnectError::Busy { .. }) => {
                eprintln!("retrying after {e}");
                Err(e)
            }
            Err(e) => panic!("no hello-ok: {e}"),
        }
    })
    .await;
    let health = client.call("health", json!({})).await.expect("health");
    assert_eq!(health, json!({ "status": "ok" }));
    drop(attack);
}

/// Binds a client socket to `ip` (any loopback address works on Linux) and connects.
async fn connect_from(ip: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((ip, 0)))
        .expect("bind a loopback address");
    socket.connect(addr).await.expect("connect")
}

#[tokio::test]
async fn every_loopback_address_counts_as_one_for_unauthenticated_connections() {
    let gw = Gateway::start(
        GatewaySettings {
            max_preauth_per_ip: 2,
            ..settings()
        },
        true,
    )
    .await;
    // 4 × 2 silent connections: 127.0.0.1's whole allowance.
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(connect_from([127, 0, 0, 1], gw.addr).await);
    }
    // Accepted in order: the next one, from 127.0.0.2, is past the cap and refused unread.
    let mut other = connect_from([127, 0, 0, 2], gw.addr).await;
    let answer = read_until_closed(&mut other).await;
    let message = answered_503(&answer, "too_many_connections_from_address");
    assert!(
        message.contains("maximum of 8 unauthenticated"),
        "{message}"
    );

    // One closes; another loopback address gets its place.
    drop(silent.pop());
    eventually(DEADLINE, "127.0.0.3 is served", async || {
        let mut stream = connect_from([127, 0, 0, 3], gw.addr).await;
        let _ = stream.write_all(GET_HEALTH.as_bytes()).await;
        let answer = read_until_closed(&mut stream).await;
        if answer.starts_with("HTTP/1.1 200 ") {
            return Ok(());
        }
        assert!(
            answer.contains("too_many_connections_from_address"),
            "{answer}"
        );
        Err(format!("still refused: {answer}"))
    })
    .await;
}

/// A node gone for `node_forget_after_ms` is forgotten: `nodes.list` no longer shows it and
/// `nodes.invoke` says `unknown_node` instead of `node_offline`.
#[tokio::test]
async fn a_node_gone_long_enough_is_forgotten() {
    let settings = GatewaySettings {
        node_forget_after_ms: 300,
        ..settings()
    };
    let gw = Gateway::start(settings, true).await;
    let mut op = gw.operator().await;
    let node = gw.node("box", &["uptime"]).await;
    drop(node);
    eventually(DEADLINE, "the node is disconnected", async || {
        gw.state.counts().1 == 0
    })
    .await;
    let invoke = json!({ "node": "box", "command": "uptime" });
    let res = call(&mut op, "1", "nodes.invoke", invoke.clone()).await;
    assert_eq!(error_code(&res), "node_offline", "{res}");
    eventually(DEADLINE, "the node is forgotten", async || {
        let list = call(&mut op, "l", "nodes.list", json!({})).await;
        if list["payload"] == json!([]) {
            Ok(())
        } else {
            Err(format!("still listed: {list}"))
        }
    })
    .await;
    let res = call(&mut op, "2", "nodes.invoke", invoke).await;
    assert_eq!(error_code(&res), "unknown_node", "{res}");
}

/// An unlisted node's name stays its operator's while it is remembered: another operator
/// cannot squat it during the node's reconnect and receive its invocations.
#[tokio::test]
async fn an_unlisted_node_name_cannot_be_squatted_while_its_node_is_away() {
    let mut settings = principal_settings();
    settings.allow_unlisted_nodes = true;
    settings.operators.insert(
        "eve".to_string(),
        gateway::Credential {
            token: Some("eve-token".into()),
            token_file: None,
        },
    );
    let gw = Gateway::start(settings, true).await;
    let laptop = json!({ "node": { "name": "laptop", "commands": ["uptime"] } });
    let (node, _) = gw.hello_as("node", OPS, laptop.clone()).await;
    drop(node);
    eventually(DEADLINE, "the node is away", async || {
        gw.state.counts().1 == 0
    })
    .await;
    assert_eq!(
        refused(&gw, "node", "eve-token", laptop.clone()).await,
        "unauthorized"
    );
    // Its own operator's credential gets it back.
    let (_back, _) = gw.hello_as("node", OPS, laptop).await;
    assert_eq!(gw.state.counts().1, 1);
}

/// Checks that a raw HTTP `answer` is a 503 with `Retry-After: 1` and the JSON error
/// `code`; returns its message.
fn answered_503(answer: &str, code: &str) -> String {
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(
        head.lines()
            .any(|l| l.eq_ignore_ascii_case("retry-after: 1")),
        "{answer}"
    );
    let body: Value = serde_json::from_str(body).expect("JSON body");
    assert_eq!(body["error"]["code"], code, "{answer}");
    body["error"]["message"]
        .as_str()
        .expect("message")
        .to_string()
}
