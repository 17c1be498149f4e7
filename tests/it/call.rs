//! Integration tests: `warden call` as a real process, against a fake gateway written here
//! (which plays refusals, 1013, 1012, dropped connections and answers, and counts what it
//! receives) and against the real gateway of `warden run`.
//!
//! Waits are conditions with deadlines; the only fixed offset is the scenario's own "start
//! the gateway ~400 ms after the call".

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use warden_actors::gateway::protocol::{Frame, close, code, try_again_reason};

use crate::support::{Launch, TempDir, Warden, free_port};

/// `warden call METHOD --gateway URL EXTRA…` in a fresh directory (so no
/// `config/warden.toml` is picked up).
fn call(name: &str, method: &str, url: &str, extra: &[&str]) -> Warden {
    let mut args = vec!["call", method, "--gateway", url];
    args.extend_from_slice(extra);
    Launch::new(name, &args).spawn()
}

/// What the fake gateway does with one connection.
#[derive(Debug, Clone, Copy)]
enum Play {
    /// Close 1013 right after the upgrade, with `retry_after_ms`.
    Starting(u64),
    /// Challenge, read `connect`, close 1012.
    Restart,
    /// Handshake, then answer every request with `{"method": …, "fake": true}`.
    Answer,
    /// Handshake, read one request, then drop the TCP connection without a close frame.
    DropAfterRequest,
    /// Answer `connect` with `unauthorized` and close 1008.
    Unauthorized,
}

/// What the fake gateway saw.
#[derive(Debug, Default)]
struct Seen {
    /// When each connection was accepted.
    accepted: Vec<Instant>,
    /// Every request method after `connect`, in order.
    requests: Vec<String>,
}

/// A fake gateway on `port`: connection `i` is played as `plays[i]` (the last repeats).
struct FakeGateway {
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

impl FakeGateway {
    async fn start(port: u16, plays: Vec<Play>) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the fake gateway");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let state = seen.clone();
        let task = tokio::spawn(async move {
            let mut sessions = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let index = {
                    let mut seen = state.lock().expect("seen");
                    seen.accepted.push(Instant::now());
                    seen.accepted.len() - 1
                };
                let play = plays[index.min(plays.len() - 1)];
                sessions.spawn(play_one(tcp, play, state.clone()));
            }
        });
        Self { seen, task }
    }

    fn accepted(&self) -> Vec<Instant> {
        self.seen.lock().expect("seen").accepted.clone()
    }

    fn requests(&self) -> Vec<String> {
        self.seen.lock().expect("seen").requests.clone()
    }
}

impl Drop for FakeGateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Ws = WebSocketStream<TcpStream>;

async fn play_one(tcp: TcpStream, play: Play, seen: Arc<Mutex<Seen>>) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
        return;
    };
    if let Play::Starting(ms) = play {
        return close_with(&mut ws, close::TRY_AGAIN, &try_again_reason(ms)).await;
    }
    send(
        &mut ws,
        Frame::event("connect.challenge", json!({"nonce": "n", "ts": 0})),
    )
    .await;
    let Some((id, method)) = recv_req(&mut ws).await else {
        return;
    };
    assert_eq!(method, "connect");
    match play {
        Play::Restart => return close_with(&mut ws, close::RESTART, "service restart").await,
        Play::Unauthorized => {
            send(&mut ws, Frame::err(id, code::UNAUTHORIZED, "wrong token")).await;
            return close_with(&mut ws, close::POLICY, "unauthorized").await;
        }
        _ => {}
    }
    let hello = json!({
        "type": "hello-ok",
        "server": {"version": "fake"},
        "policy": {"tick_interval_ms": 30_000, "max_frame_bytes": 1 << 20},
    });
    send(&mut ws, Frame::ok(id, hello)).await;
    while let Some((id, method)) = recv_req(&mut ws).await {
        seen.lock().expect("seen").requests.push(method.clone());
        if matches!(play, Play::DropAfterRequest) {
            return drop(ws);
        }
        send(
            &mut ws,
            Frame::ok(id, json!({"method": method, "fake": true})),
        )
        .await;
    }
}

async fn send(ws: &mut Ws, frame: Frame) {
    let _ = ws.send(Message::text(frame.to_text())).await;
}

/// The next request's (id, method), or None when the client left.
async fn recv_req(ws: &mut Ws) -> Option<(String, String)> {
    while let Some(Ok(message)) = ws.next().await {
        if let Message::Text(text) = message
            && let Ok(Frame::Req { id, method, .. }) = Frame::parse(text.as_str())
        {
            return Some((id, method));
        }
    }
    None
}

async fn close_with(ws: &mut Ws, code: u16, reason: &str) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    let _ = ws.close(Some(frame)).await;
    while let Some(Ok(_)) = ws.next().await {}
}

/// The retry lines of `stderr`: `warden: attempt N of 5 failed: …; retrying in D ms`.
fn retries(stderr: &[String]) -> Vec<&String> {
    stderr
        .iter()
        .filter(|l| l.starts_with("warden: attempt "))
        .collect()
}

fn gap(accepted: &[Instant], i: usize) -> Duration {
    accepted[i + 1] - accepted[i]
}

#[tokio::test]
async fn call_retries_through_refusal_1013_and_1012_then_prints_the_answer() {
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/ws");
    let call = call("retries", "health", &url, &["--token", "t"]);
    // The first attempt finds nobody listening; then the gateway "starts".
    call.wait_for_stderr(
        "attempt 1 of 5 failed: connection refused",
        Duration::from_secs(10),
    )
    .await;
    let fake = FakeGateway::start(
        port,
        vec![Play::Starting(1000), Play::Restart, Play::Answer],
    )
    .await;

    let (code, stdout, stderr) = call.finish(Duration::from_secs(15)).await;
    assert_eq!(code, 0, "stderr:\n{}", stderr.join("\n"));
    let answer: Value = serde_json::from_str(&stdout).expect("JSON on stdout");
    assert_eq!(answer, json!({"method": "health", "fake": true}));
    assert!(
        stdout.contains("\n  \"fake\": true"),
        "pretty-printed: {stdout}"
    );
    assert_eq!(fake.requests(), ["health"]);

    // One line per retry, naming the attempt, the cause, the URL and the delay. (If the
    // fake gateway bound late, more refusals come first; the server's causes still follow.)
    let lines = retries(&stderr);
    assert_eq!(
        lines[0],
        &format!("warden: attempt 1 of 5 failed: connection refused ({url}); retrying in 150 ms")
    );
    let n = lines.len();
    assert!((3..=4).contains(&n), "{lines:#?}");
    assert!(
        lines[n - 2].contains("(1013): starting; retry_after_ms=1000"),
        "{lines:#?}"
    );
    assert!(lines[n - 2].ends_with("retrying in 1000 ms"), "{lines:#?}");
    assert!(
        lines[n - 1].contains("(1012): service restart"),
        "{lines:#?}"
    );
    assert_eq!(stderr.len(), n, "nothing else on stderr: {stderr:#?}");

    // The server's retry_after_ms (1000) beat the schedule's 350/750 ms; 1012 waited 750+.
    let accepted = fake.accepted();
    assert_eq!(accepted.len(), 3);
    let slack = Duration::from_millis(1500);
    assert!(
        (Duration::from_millis(1000)..Duration::from_millis(1000) + slack)
            .contains(&gap(&accepted, 0))
    );
    assert!(
        (Duration::from_millis(750)..Duration::from_millis(1500) + slack)
            .contains(&gap(&accepted, 1))
    );
}

#[tokio::test]
async fn call_gives_up_after_five_attempts_naming_the_cause_and_url() {
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/ws");
    let started = Instant::now();
    let (code, stdout, stderr) = call("unreachable", "status", &url, &[])
        .finish(Duration::from_secs(15))
        .await;
    assert_eq!(code, 1);
    assert_eq!(stdout, "");
    assert!(started.elapsed() >= Duration::from_millis(150 + 350 + 750 + 1500));
    let delays: Vec<_> = retries(&stderr)
        .iter()
        .map(|l| {
            l.rsplit("retrying in ")
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(delays, ["150 ms", "350 ms", "750 ms", "1500 ms"]);
    assert_eq!(
        stderr.last().map(String::as_str),
        Some(
            format!("warden: gateway unreachable after 5 attempts: connection refused ({url})")
                .as_str()
        )
    );
}

#[tokio::test]
async fn a_delivered_nodes_invoke_is_never_sent_again() {
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/ws");
    let fake = FakeGateway::start(port, vec![Play::DropAfterRequest, Play::Answer]).await;
    let params = r#"{"node":"build-box","command":"uptime"}"#;
    let (code, stdout, stderr) = call("invoke", "nodes.invoke", &url, &["--params", params])
        .finish(Duration::from_secs(15))
        .await;
    assert_eq!(code, 1, "stdout: {stdout}");
    assert_eq!(stderr.len(), 1, "{stderr:#?}");
    assert!(
        stderr[0].starts_with("warden: nodes.invoke: gateway closed the connection (1006)"),
        "{stderr:#?}"
    );
    assert!(
        stderr[0].ends_with(&format!(
            "({url}); the request may have been delivered; not retrying"
        )),
        "{stderr:#?}"
    );
    // The process has exited: the count is final.
    assert_eq!(fake.requests(), ["nodes.invoke"]);
    assert_eq!(fake.accepted().len(), 1);
}

#[tokio::test]
async fn a_read_only_call_is_retried_after_a_lost_connection() {
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/ws");
    let fake = FakeGateway::start(port, vec![Play::DropAfterRequest, Play::Answer]).await;
    let (code, stdout, stderr) = call("read-only", "nodes.list", &url, &[])
        .finish(Duration::from_secs(15))
        .await;
    assert_eq!(code, 0, "{stderr:#?}");
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).expect("JSON")["method"],
        "nodes.list"
    );
    assert_eq!(fake.requests(), ["nodes.list", "nodes.list"]);
    assert_eq!(retries(&stderr).len(), 1, "{stderr:#?}");
}

#[tokio::test]
async fn a_wrong_token_fails_at_once() {
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/ws");
    let fake = FakeGateway::start(port, vec![Play::Unauthorized]).await;
    let (code, _, stderr) = call("token", "health", &url, &["--token", "nope"])
        .finish(Duration::from_secs(15))
        .await;
    assert_eq!(code, 1);
    assert_eq!(
        stderr,
        [format!(
            "warden: cannot connect to {url}: gateway rejected the connection: unauthorized: wrong token"
        )]
    );
    assert_eq!(fake.accepted().len(), 1);
}

#[tokio::test]
async fn params_that_are_not_a_json_object_exit_64() {
    let url = format!("ws://127.0.0.1:{}/ws", free_port());
    for params in ["[1,2]", "{not json"] {
        let (code, _, stderr) = call("params", "nodes.invoke", &url, &["--params", params])
            .finish(Duration::from_secs(10))
            .await;
        assert_eq!(code, 64, "{stderr:#?}");
        assert_eq!(stderr.len(), 1, "{stderr:#?}");
        assert!(stderr[0].starts_with("warden: --params "), "{stderr:#?}");
    }
}

/// The restart race (DESIGN.md, failure 2) against the real gateway: a call started while
/// the gateway is down comes back with the answer once `warden run` is up.
#[tokio::test]
async fn a_call_made_while_the_gateway_is_down_succeeds_once_it_is_up() {
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/ws");
    let started = Instant::now();
    let call = call("race", "health", &url, &["--token", "race-token"]);
    call.wait_for_stderr(
        "attempt 1 of 5 failed: connection refused",
        Duration::from_secs(10),
    )
    .await;
    // The scenario's offset: the gateway comes up ~400 ms after the call started.
    tokio::time::sleep_until(started + Duration::from_millis(400)).await;
    let bind = format!("127.0.0.1:{port}");
    let run = Launch::run("race-run")
        .gateway_bind(&bind)
        .env("WARDEN_GATEWAY__TOKEN", "race-token")
        .spawn();

    let (code, stdout, stderr) = call.finish(Duration::from_secs(15)).await;
    assert_eq!(
        code,
        0,
        "call stderr:\n{}\nrun logs:\n{}",
        stderr.join("\n"),
        run.stderr().join("\n")
    );
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).expect("JSON"),
        json!({"status": "ok"})
    );
    let lines = retries(&stderr);
    assert!(!lines.is_empty() && lines.len() <= 4, "{lines:#?}");
    assert!(lines[0].contains("connection refused"), "{lines:#?}");
    drop(run);
}

/// With no token configured, `warden run` generates an operator token into
/// `<state.dir>/gateway.token` (0600): a client without it is refused, `warden call` run in
/// the same directory finds it, and the token never appears in the logs.
#[tokio::test]
async fn the_tokenless_default_refuses_strangers_and_warden_call_finds_the_token() {
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/ws");
    let bind = format!("127.0.0.1:{port}");
    let dir = Arc::new(TempDir::new("tokenless"));
    let run = Launch::in_dir(
        &dir,
        &[
            "run",
            "--gateway-bind",
            &bind,
            "--admin-bind",
            "127.0.0.1:0",
        ],
    )
    .spawn();
    run.wait_for_stderr("generated an operator token", Duration::from_secs(10))
        .await;
    let file = dir.join(".warden/gateway.token");
    let token = std::fs::read_to_string(&file).expect("token file");
    let token = token.trim();
    assert_eq!(token.len(), 64, "{token:?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // A stranger: no token, or a wrong one.
    for extra in [&[][..], &["--token", "guess"][..]] {
        let (code, _, stderr) = call("stranger", "health", &url, extra)
            .finish(Duration::from_secs(15))
            .await;
        assert_eq!(code, 1, "{stderr:#?}");
        assert!(
            stderr.iter().any(|l| l.contains("unauthorized")),
            "{stderr:#?}"
        );
    }
    // `warden call` in the same directory reads the generated token.
    let same_dir = Launch::in_dir(&dir, &["call", "health", "--gateway", &url]).spawn();
    let (code, stdout, stderr) = same_dir.finish(Duration::from_secs(15)).await;
    assert_eq!(code, 0, "{stderr:#?}");
    assert!(stdout.contains("\"ok\""), "{stdout}");
    assert!(
        !run.stderr().iter().any(|l| l.contains(token)),
        "the token must never be logged"
    );
}
