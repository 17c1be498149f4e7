//! Tests of the approvals broker over real sockets: the `gateway` subtree with its broker,
//! started in this process the way `warden run` starts it (so the test can hold the
//! in-memory credential of an approval handler, which no other process can), operators and
//! nodes as real clients — one a real `warden node` process — and a restart on the same
//! state directory.
//!
//! Account `ops` enables approvals with two approvers; account `quiet` has a handler
//! credential but no approvers the broker knows.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use warden_actors::gateway::client::{
    CallError, ConnectError, ConnectOptions, GatewayClient, Incoming,
};
use warden_actors::gateway::protocol::auth::Secret;
use warden_actors::gateway::protocol::grant::Grant;
use warden_actors::gateway::protocol::{CommandInfo, ErrorBody, NodeInfo, Role};
use warden_actors::gateway::{ApprovalsSettings, GatewaySettings, GatewayState};
use warden_actors::supervision::Tree;

use crate::support::{
    Launch, Scenario, TempDir, Warden, client_info, gateway_tree, next_event, node_config, now_ms,
    wait_node,
};

const TOKEN: &str = "approvals-test-token";

/// How long any one step may take before a test fails.
const STEP: Duration = Duration::from_secs(10);

/// A running gateway subtree with its broker.
struct Rig {
    tree: Tree,
    url: String,
    /// The approval handlers' credentials, by account.
    handlers: Vec<(&'static str, Secret)>,
}

/// Starts the gateway with its broker storing under `state`; `TOKEN` is operator
/// `default`'s and admits unlisted nodes.
async fn start(state: &Path) -> Rig {
    let settings = GatewaySettings {
        bind: SocketAddr::from(([127, 0, 0, 1], 0)),
        token: Some(TOKEN.to_string()),
        allow_unlisted_nodes: true,
        ..GatewaySettings::default()
    };
    let gateway = GatewayState::new(settings);
    let mut approvals = ApprovalsSettings::new(state.join("approvals"));
    approvals.approvers.insert(
        "ops".into(),
        vec!["@Owner:localhost".into(), "@second:localhost".into()],
    );
    assert!(gateway.set_approvals(approvals).is_ok());
    let handlers = vec![
        ("ops", gateway.add_approver("ops")),
        ("quiet", gateway.add_approver("quiet")),
    ];
    let (tree, addr) = gateway_tree(&gateway).await;
    assert!(gateway.set_tree(tree.handle()).is_ok());
    Rig {
        tree,
        url: format!("ws://{addr}/ws"),
        handlers,
    }
}

impl Rig {
    /// The approval handler of `account`, subscribed to the approval events.
    async fn approver(&self, account: &str) -> GatewayClient {
        let (_, credential) = self
            .handlers
            .iter()
            .find(|(a, _)| *a == account)
            .expect("a handler of that account");
        let mut options = ConnectOptions::new(Role::Approver, credential.expose(), client_info());
        options.account = Some(account.to_string());
        let mut client = connect(&self.url, options).await;
        let events = json!({ "events": ["approval.requested", "approval.resolved"] });
        client.call("subscribe", events).await.expect("subscribe");
        client
    }

    /// Stops the tree as `warden run` does on SIGTERM.
    async fn stop(self) {
        let report = self.tree.shutdown(Duration::from_secs(5)).await;
        assert!(report.graceful, "still running: {:?}", report.still_running);
    }
}

async fn connect(url: &str, options: ConnectOptions) -> GatewayClient {
    GatewayClient::connect(url, options)
        .await
        .expect("connect")
        .0
}

async fn operator(url: &str) -> GatewayClient {
    crate::support::operator(url, TOKEN).await.expect("connect")
}

/// A node played by a gateway client. Its one command, `disk`, needs an approval: it
/// answers every `node.invoke` with what it was asked and whether the grant that came
/// with it is valid for its credential, name, command and arguments.
async fn fake_node(url: &str, name: &str) -> JoinHandle<()> {
    let mut options = ConnectOptions::new(Role::Node, TOKEN, client_info());
    options.node = Some(NodeInfo {
        name: name.to_string(),
        commands: vec![CommandInfo {
            name: "disk".into(),
            approval: true,
        }],
    });
    let mut node = connect(url, options).await;
    let key = Secret::new(TOKEN);
    let node_name = name.to_string();
    let task = tokio::spawn(async move {
        while let Ok(incoming) = node.next_event().await {
            if let Incoming::Request { id, method, params } = incoming {
                let answer = if method == "node.invoke" {
                    let grant: Option<Grant> = serde_json::from_value(params["grant"].clone()).ok();
                    let granted = grant.is_some_and(|g| {
                        let args = params.get("args").cloned().unwrap_or(Value::Null);
                        g.verify(&key, &node_name, "disk", &args, now_ms()).is_ok()
                    });
                    Ok(json!({ "exit_code": 0, "ran": params, "granted": granted }))
                } else {
                    Err(ErrorBody {
                        code: "unknown_method".into(),
                        message: method,
                    })
                };
                if node.respond(&id, answer).await.is_err() {
                    return;
                }
            }
        }
    });
    wait_node(url, TOKEN, name, STEP).await;
    task
}

/// Starts `warden node` named `name` against `url`, with a command `hello`.
fn real_node(name: &str, url: &str) -> Warden {
    let config = format!(
        "{}[node.commands.hello]\nargv = [\"echo\", \"hello from {name}\"]\n",
        node_config(url, TOKEN, name)
    );
    Launch::node(name, &config).spawn()
}

/// Sends `approvals.request` on its own connection; the task ends with the answer.
async fn request(url: &str, params: Value) -> JoinHandle<Result<Value, CallError>> {
    let mut requester = operator(url).await;
    tokio::spawn(async move { requester.call("approvals.request", params).await })
}

/// The next event named `name`, skipping others (ticks).
async fn next(client: &mut GatewayClient, name: &str) -> Value {
    next_event(client, name, STEP)
        .await
        .unwrap_or_else(|| panic!("no {name} event within {STEP:?}"))
}

/// The answer of a requester's call.
async fn answer(
    task: JoinHandle<Result<Value, CallError>>,
    within: Duration,
) -> Result<Value, CallError> {
    tokio::time::timeout(within, task)
        .await
        .expect("the requester got no answer in time")
        .expect("requester task")
}

/// The next `approval.requested` of `approver`'s account, with each notification it names
/// reported delivered (`approvals.notified`) in room `!dm:localhost`, as a handler does:
/// only an approver who was told may decide.
async fn asked(approver: &mut GatewayClient) -> Value {
    let requested = next(approver, "approval.requested").await;
    let id = requested["id"].as_str().expect("id").to_string();
    for target in requested["notify"].as_array().cloned().unwrap_or_default() {
        let who = target["approver"].as_str().expect("approver");
        let told = json!({"id": id, "approver": who, "room_id": DM,
            "event_id": format!("$req-{id}-{who}")});
        let recorded = approver
            .call("approvals.notified", told)
            .await
            .expect("notified");
        assert_eq!(recorded["recorded"], true, "{recorded}");
    }
    requested
}

/// The room the test handlers "notify" in.
const DM: &str = "!dm:localhost";

/// `approvals.resolve`'s params: `by` decides `decision` on `id`, written in [`DM`].
fn decide(id: &(impl serde::Serialize + ?Sized), decision: &str, by: &str) -> Value {
    json!({"id": id, "decision": decision, "by": by, "room_id": DM, "event_id": "$answer"})
}

/// The error code of a failed call.
fn code(result: Result<Value, CallError>) -> String {
    match result {
        Err(CallError::Failed { code, .. }) => code,
        other => panic!("expected an error answer, got {other:?}"),
    }
}

fn failed(result: Result<Value, CallError>) -> (String, String) {
    match result {
        Err(CallError::Failed { code, message }) => (code, message),
        other => panic!("expected an error answer, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_request_runs_on_the_node_and_answers_the_requester() {
    let state = TempDir::new("approvals-state-approve");
    let rig = start(state.path()).await;
    let mut node = real_node("approvals-box", &rig.url);
    wait_node(&rig.url, TOKEN, "approvals-box", STEP).await;
    let mut approver = rig.approver("ops").await;

    let params = json!({
        "node": "approvals-box", "command": "hello", "reason": "smoke test"
    });
    let requester = request(&rig.url, params).await;
    let requested = asked(&mut approver).await;
    let id = requested["id"].as_str().expect("id").to_string();
    assert!(
        id.len() == 8
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{id}"
    );
    assert_eq!(
        (
            &requested["node"],
            &requested["command"],
            &requested["args"],
            &requested["reason"]
        ),
        (
            &json!("approvals-box"),
            &json!("hello"),
            &Value::Null,
            &json!("smoke test")
        )
    );
    let expires = requested["expires_at_ms"].as_u64().expect("expires_at_ms");
    let now = now_ms();
    assert!(
        expires > now + 290_000 && expires <= now + 300_000,
        "default timeout: {expires} vs {now}"
    );
    let file = state.join("approvals").join(format!("{id}.json"));
    let mode = std::fs::metadata(&file)
        .expect("stored")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Only approvers resolve, only as a listed approver of their account; only operators
    // request.
    let mut op = operator(&rig.url).await;
    let resolve = |by: &str| decide(&id, "approve", by);
    assert_eq!(
        code(
            op.call("approvals.resolve", resolve("@owner:localhost"))
                .await
        ),
        "forbidden"
    );
    assert_eq!(
        code(
            approver
                .call("approvals.resolve", resolve("@stranger:localhost"))
                .await
        ),
        "forbidden"
    );
    let mut quiet = rig.approver("quiet").await;
    assert_eq!(
        code(
            quiet
                .call("approvals.resolve", resolve("@owner:localhost"))
                .await
        ),
        "forbidden"
    );
    let again = json!({"node": "approvals-box", "command": "hello", "reason": "x"});
    assert_eq!(
        code(approver.call("approvals.request", again).await),
        "forbidden"
    );
    let listed = op.call("approvals.list", json!({})).await.expect("list");
    let listed = &listed["approvals"];
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["resolved"], false);

    // A listed approver, in another case: approved; the node runs the command.
    let decided = approver
        .call("approvals.resolve", resolve("@OWNER:localhost"))
        .await
        .expect("resolve");
    assert_eq!(decided, json!({"id": id, "decision": "approved"}));
    let deny = decide(&id, "deny", "@second:localhost");
    assert_eq!(
        code(approver.call("approvals.resolve", deny).await),
        "already_resolved"
    );
    let out = answer(requester, STEP).await.expect("approved");
    assert_eq!(
        (&out["id"], &out["decision"], &out["by"]),
        (&json!(id), &json!("approved"), &json!("@OWNER:localhost"))
    );
    assert_eq!(
        (
            out["result"]["exit_code"].as_i64(),
            out["result"]["stdout"].as_str()
        ),
        (Some(0), Some("hello from approvals-box\n")),
        "{out}"
    );
    let resolved = next(&mut approver, "approval.resolved").await;
    assert_eq!(resolved, out);
    let listed = approver
        .call("approvals.list", json!({}))
        .await
        .expect("list");
    let listed = &listed["approvals"];
    assert_eq!(
        (
            &listed[0]["id"],
            &listed[0]["resolved"],
            &listed[0]["decision"]
        ),
        (&json!(id), &json!(true), &json!("approved"))
    );

    // Approved, but the node refuses to run it (`hello` takes no args): the outcome
    // carries the node's error instead of a result.
    let with_args = json!({
        "node": "approvals-box", "command": "hello", "args": ["x"], "reason": "with args"
    });
    let requester = request(&rig.url, with_args).await;
    let id2 = asked(&mut approver).await["id"].clone();
    let approve = decide(&id2, "approve", "@second:localhost");
    approver
        .call("approvals.resolve", approve)
        .await
        .expect("resolve");
    let out = answer(requester, STEP).await.expect("answered");
    assert_eq!((&out["id"], &out["decision"]), (&id2, &json!("approved")));
    assert!(
        out.get("result").is_none() && out["error"]["code"].is_string(),
        "{out}"
    );
    assert_eq!(next(&mut approver, "approval.resolved").await, out);

    // Unknown ids, bad params, an approver without an account.
    let unknown = decide(&"zzzzzzzz", "deny", "@owner:localhost");
    assert_eq!(
        code(approver.call("approvals.resolve", unknown).await),
        "unknown_approval"
    );
    let (c, message) = failed(
        op.call(
            "approvals.request",
            json!({"node": "approvals-box", "command": "hello"}),
        )
        .await,
    );
    assert_eq!(
        (c.as_str(), message.contains("`reason`")),
        ("bad_request", true),
        "{message}"
    );
    let bad_timeout =
        json!({"node": "approvals-box", "command": "hello", "reason": "r", "timeout_s": 0});
    let (c, message) = failed(op.call("approvals.request", bad_timeout).await);
    assert_eq!(
        (c.as_str(), message.contains("`timeout_s`")),
        ("bad_request", true),
        "{message}"
    );
    let bad_decision = decide(&id, "maybe", "@owner:localhost");
    let (c, message) = failed(approver.call("approvals.resolve", bad_decision).await);
    assert_eq!(
        (c.as_str(), message.contains("`decision`")),
        ("bad_request", true),
        "{message}"
    );
    let ghost = json!({"node": "nobody", "command": "hello", "reason": "r"});
    assert_eq!(
        code(op.call("approvals.request", ghost).await),
        "unknown_node"
    );
    let undeclared = json!({"node": "approvals-box", "command": "rm", "reason": "r"});
    assert_eq!(
        code(op.call("approvals.request", undeclared).await),
        "unknown_command"
    );
    let no_account = ConnectOptions::new(Role::Approver, TOKEN, client_info());
    match GatewayClient::connect(&rig.url, no_account).await {
        Err(ConnectError::Rejected { code, .. }) => assert_eq!(code, "bad_request"),
        other => panic!(
            "an approver without account was not refused: {:?}",
            other.map(|_| ())
        ),
    }
    // The self-approval attack: an operator's token cannot connect as an approver.
    let mut as_approver = ConnectOptions::new(Role::Approver, TOKEN, client_info());
    as_approver.account = Some("ops".into());
    match GatewayClient::connect(&rig.url, as_approver).await {
        Err(ConnectError::Rejected { code, .. }) => assert_eq!(code, "unauthorized"),
        other => panic!(
            "an operator's token was admitted as an approver: {:?}",
            other.map(|_| ())
        ),
    }
    assert!(node.is_running());
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_timed_out_and_orphaned_requests() {
    let state = TempDir::new("approvals-state-deny");
    let rig = start(state.path()).await;
    let node = fake_node(&rig.url, "deny-box").await;
    let mut approver = rig.approver("ops").await;
    let params = |timeout_s: Option<u64>| {
        let mut p = json!({"node": "deny-box", "command": "disk", "reason": "cleanup"});
        if let Some(t) = timeout_s {
            p["timeout_s"] = json!(t);
        }
        p
    };

    // Denied by an approver: the requester learns who, and nothing runs.
    let requester = request(&rig.url, params(None)).await;
    let id = asked(&mut approver).await["id"].clone();
    let deny = decide(&id, "deny", "@second:localhost");
    let decided = approver
        .call("approvals.resolve", deny)
        .await
        .expect("deny");
    assert_eq!(decided, json!({"id": id, "decision": "denied"}));
    let out = answer(requester, STEP).await.expect("answered");
    assert_eq!(
        out,
        json!({"id": id, "decision": "denied", "by": "@second:localhost",
            "via": {"account": "ops", "room_id": DM, "event_id": "$answer"}})
    );
    assert_eq!(next(&mut approver, "approval.resolved").await, out);

    // No decision within timeout_s: denied by "timeout".
    let asked_at = Instant::now();
    let requester = request(&rig.url, params(Some(1))).await;
    let id = asked(&mut approver).await["id"].clone();
    let out = answer(requester, STEP).await.expect("answered");
    let waited = asked_at.elapsed();
    assert_eq!(
        out,
        json!({"id": id, "decision": "denied", "by": "timeout"})
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    let late = decide(&id, "approve", "@owner:localhost");
    assert_eq!(
        code(approver.call("approvals.resolve", late).await),
        "already_resolved"
    );

    assert_eq!(next(&mut approver, "approval.resolved").await, out);

    // The requester goes away (its connection dropped with the task); the approval is
    // still decided, run and announced.
    let gone = request(&rig.url, params(None)).await;
    let id = asked(&mut approver).await["id"].clone();
    gone.abort();
    assert!(
        gone.await.is_err_and(|e| e.is_cancelled()),
        "answered before any decision"
    );
    let approve = decide(&id, "approve", "@owner:localhost");
    approver
        .call("approvals.resolve", approve)
        .await
        .expect("approve");
    let resolved = next(&mut approver, "approval.resolved").await;
    assert_eq!(resolved["id"], id);
    assert_eq!(resolved["result"]["ran"]["command"], "disk", "{resolved}");
    assert_eq!(resolved["result"]["granted"], true, "{resolved}");
    // Without an approval the gated command is refused at the gateway.
    let mut op = operator(&rig.url).await;
    let direct = json!({"node": "deny-box", "command": "disk"});
    assert_eq!(
        code(op.call("nodes.invoke", direct).await),
        "approval_required"
    );
    let health = op.call("health", json!({})).await.expect("health");
    assert_eq!(health["status"], "ok");
    node.abort();
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_approval_survives_a_restart_and_is_still_resolvable() {
    let state = TempDir::new("approvals-state-restart");
    let rig = start(state.path()).await;
    let node = fake_node(&rig.url, "restart-box").await;
    let mut approver = rig.approver("ops").await;
    let params = json!({"node": "restart-box", "command": "disk", "args": ["-h"], "reason": "r"});
    let survivor_requester = request(&rig.url, params.clone()).await;
    let survivor = asked(&mut approver).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let doomed_requester = request(&rig.url, params).await;
    let doomed = asked(&mut approver).await["id"]
        .as_str()
        .expect("id")
        .to_string();

    rig.stop().await;
    // The open requests end with the connection (the service restarts).
    for requester in [survivor_requester, doomed_requester] {
        let err = answer(requester, STEP).await.expect_err("no decision");
        assert!(err.is_connection_lost(), "{err}");
    }
    node.abort();

    // While warden is down, `doomed` expires: its stored expiry moves into the past.
    let file = state.join("approvals").join(format!("{doomed}.json"));
    let mut stored: Value =
        serde_json::from_slice(&std::fs::read(&file).expect("stored")).expect("json");
    stored["expires_at_ms"] = json!(1);
    std::fs::write(&file, serde_json::to_vec(&stored).expect("json")).expect("rewrite");

    let rig = start(state.path()).await;
    let mut op = operator(&rig.url).await;
    let listed = op.call("approvals.list", json!({})).await.expect("list");
    let find = |id: &str| {
        listed["approvals"]
            .as_array()
            .and_then(|l| l.iter().find(|a| a["id"] == id))
            .cloned()
            .unwrap_or_else(|| panic!("{id} not listed: {listed}"))
    };
    let s = find(&survivor);
    assert_eq!(
        (&s["resolved"], &s["args"]),
        (&json!(false), &json!(["-h"])),
        "{s}"
    );
    assert!(s.get("decision").is_none(), "{s}");
    let d = find(&doomed);
    assert_eq!(
        (&d["resolved"], &d["decision"], &d["by"]),
        (&json!(true), &json!("denied"), &json!("timeout")),
        "{d}"
    );

    // Resolvable after the restart: the node (back under its name) runs it.
    let node = fake_node(&rig.url, "restart-box").await;
    let mut approver = rig.approver("ops").await;
    let approve = decide(&survivor, "approve", "@owner:localhost");
    let decided = approver
        .call("approvals.resolve", approve)
        .await
        .expect("resolve");
    assert_eq!(decided["decision"], "approved");
    let resolved = next(&mut approver, "approval.resolved").await;
    assert_eq!(
        (
            &resolved["id"],
            &resolved["by"],
            &resolved["result"]["ran"]["args"]
        ),
        (&json!(survivor), &json!("@owner:localhost"), &json!(["-h"])),
        "{resolved}"
    );
    assert_eq!(resolved["result"]["granted"], true, "{resolved}");
    let late = decide(&doomed, "approve", "@owner:localhost");
    assert_eq!(
        code(approver.call("approvals.resolve", late).await),
        "already_resolved"
    );
    node.abort();
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_oversized_requests_pages_list_and_skip_oversized_files() {
    // A stored file over 1 MiB, there before the start: skipped with a WARN, left in place.
    let scenario = Scenario::new("approvals-limits", TOKEN);
    let dir = scenario.state().join("approvals");
    std::fs::create_dir_all(&dir).expect("approvals dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("mode");
    let big = dir.join("bigfile1.json");
    std::fs::write(&big, vec![b' '; 1024 * 1024 + 1]).expect("big file");
    let rig = scenario.start().await;
    let warned = rig
        .warden
        .wait_for_log(
            "Skipping an approval file larger than the limit; it is left in place.",
            STEP,
        )
        .await;
    assert_eq!(warned["level"], "WARN", "{warned}");
    assert_eq!(warned["path"], big.to_str().expect("utf-8"), "{warned}");
    assert_eq!(warned["bytes"], 1024 * 1024 + 1, "{warned}");
    assert!(big.exists());

    let node = fake_node(&rig.gateway, "limits-box").await;
    // Operators may watch approvals too.
    let mut approver = operator(&rig.gateway).await;
    let events = json!({ "events": ["approval.requested"] });
    approver.call("subscribe", events).await.expect("subscribe");
    let mut op = operator(&rig.gateway).await;

    // Over a size limit: `too_large`, naming the field and the limit; nothing is stored.
    let reason = json!({"node": "limits-box", "command": "disk", "reason": "r".repeat(5 * 1024)});
    let (c, message) = failed(op.call("approvals.request", reason).await);
    assert_eq!(c, "too_large", "{message}");
    assert!(
        message.contains("`reason`") && message.contains("4096"),
        "{message}"
    );
    let args = json!({
        "node": "limits-box", "command": "disk", "reason": "r", "args": ["a".repeat(17 * 1024)]
    });
    let (c, message) = failed(op.call("approvals.request", args).await);
    assert_eq!(c, "too_large", "{message}");
    assert!(
        message.contains("`args`") && message.contains("16384"),
        "{message}"
    );
    let stored = std::fs::read_dir(&dir).expect("dir").count();
    assert_eq!(stored, 1, "only the big file");

    // 120 open approvals, each on its own requester connection.
    let mut requesters = Vec::new();
    let mut requested = std::collections::HashSet::new();
    for i in 0..120 {
        let params = json!({"node": "limits-box", "command": "disk", "reason": format!("r{i}")});
        requesters.push(request(&rig.gateway, params).await);
        let id = asked(&mut approver).await["id"]
            .as_str()
            .expect("id")
            .to_string();
        requested.insert(id);
    }
    assert_eq!(requested.len(), 120);

    // The default page is 50; pages of 50 walk all 120 once, oldest first.
    let page = op.call("approvals.list", json!({})).await.expect("list");
    assert_eq!(
        page["approvals"].as_array().map(Vec::len),
        Some(50),
        "{page}"
    );
    assert!(page["next"].is_string(), "{page}");
    let mut listed = Vec::new();
    let mut params = json!({"limit": 50});
    let mut pages = 0;
    loop {
        let page = op
            .call("approvals.list", params.clone())
            .await
            .expect("list");
        pages += 1;
        let entries = page["approvals"].as_array().expect("approvals").clone();
        assert!(entries.len() <= 50, "{}", entries.len());
        listed.extend(entries);
        match page.get("next") {
            Some(next) => params = json!({"limit": 50, "cursor": next}),
            None => break,
        }
        assert!(pages < 10, "pages never end");
    }
    assert_eq!(pages, 3);
    let ids: Vec<String> = listed
        .iter()
        .map(|a| a["id"].as_str().expect("id").to_string())
        .collect();
    let unique: std::collections::HashSet<String> = ids.iter().cloned().collect();
    assert_eq!((ids.len(), unique), (120, requested));
    let times: Vec<u64> = listed
        .iter()
        .map(|a| a["requested_at_ms"].as_u64().expect("requested_at_ms"))
        .collect();
    assert!(times.is_sorted(), "oldest first: {times:?}");
    assert!(listed.iter().all(|a| a["resolved"] == false));

    // A limit or a cursor that is not one: `bad_request`, naming the field.
    for (bad, field) in [
        (json!({"limit": 201}), "`limit`"),
        (json!({"limit": 0}), "`limit`"),
        (json!({"cursor": "page2"}), "`cursor`"),
    ] {
        let (c, message) = failed(op.call("approvals.list", bad).await);
        assert_eq!(
            (c.as_str(), message.contains(field)),
            ("bad_request", true),
            "{message}"
        );
    }

    // The gateway's metrics carry their descriptions.
    let metrics = rig.metrics().await;
    assert!(
        metrics.contains("# HELP warden_approvals_pending Approvals waiting for a decision."),
        "{metrics}"
    );
    assert!(
        metrics.contains("warden_approvals_pending 120"),
        "{metrics}"
    );
    for requester in requesters {
        requester.abort();
    }
    node.abort();
}
