//! Config reload on a running `warden run` process: `POST /admin/reload`, `SIGHUP` and
//! `warden reload` apply a changed file without restarting healthy children; a revoked
//! operator's session closes with 1008; keys that need a restart are named; an invalid
//! config changes nothing; accounts on a real Synapse start, stop and restart alone.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use warden_actors::gateway::client::CallError;

use crate::support::{
    Account, Launch, Rig, Scenario, Warden, eventually, free_port, next_event, node_config,
    operator, tree_node,
};
use crate::synapse;

/// The file before (after a `[gateway] bind`): two operators, a listener that would wait
/// 30 s before a restart.
const BEFORE: &str = r#"
[gateway.operators.alice]
token = "tok-alice"
[gateway.operators.bob]
token = "tok-bob"
[supervision.kinds.gateway_listener]
backoff = { initial_ms = 30000, max_ms = 60000, jitter = 0 }
[start_slots.approvals]
max_concurrent = 3
"#;

/// The file after (after another `[gateway] bind`, which needs a restart): bob removed, the
/// listener's first delay 100 ms, a larger pool, and a longer inbox retention (which needs
/// a restart too).
const AFTER: &str = r#"
[inbox]
retention_ms = 120000
[gateway.operators.alice]
token = "tok-alice"
[supervision.kinds.gateway_listener]
backoff = { initial_ms = 100, max_ms = 60000, jitter = 0 }
[start_slots.approvals]
max_concurrent = 7
"#;

/// `path` → generation of every node of the tree but the per-socket sessions.
fn generations(tree: &Value) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![tree];
    while let Some(node) = stack.pop() {
        let path = node["path"].as_str().unwrap_or_default().to_string();
        if !path.starts_with("root/gateway/sessions/") {
            out.insert(path, node["generation"].as_u64().unwrap_or_default());
        }
        stack.extend(node["children"].as_array().into_iter().flatten());
    }
    out
}

async fn tree(http: &reqwest::Client, admin: &str) -> Value {
    http.get(format!("{admin}/admin/tree"))
        .send()
        .await
        .expect("tree")
        .json()
        .await
        .expect("tree json")
}

async fn reload(http: &reqwest::Client, admin: &str) -> (u16, Value) {
    let resp = http
        .post(format!("{admin}/admin/reload"))
        .send()
        .await
        .expect("reload");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("reload json"))
}

fn write_config(warden: &Warden, toml: &str) {
    std::fs::write(warden.dir().join("warden.toml"), toml).expect("write warden.toml");
}

#[tokio::test]
async fn a_reload_applies_in_place_revokes_and_names_what_needs_a_restart() {
    // The gateway's address from the file (not a flag, which would win over it), on a
    // fixed port: the listener restarted below must come back on it, and the file's new
    // address waits for a restart.
    let (port, elsewhere) = (free_port(), free_port());
    let bind = |port: u16| format!("[gateway]\nbind = \"127.0.0.1:{port}\"\n");
    let file_before = format!("{}{BEFORE}", bind(port));
    let file_after = format!("{}{AFTER}", bind(elsewhere));
    let args = ["run", "--admin-bind", "127.0.0.1:0", "--log-format", "json"];
    let warden = Launch::new("reload", &args).config(&file_before).spawn();
    let admin = warden.ready().await;
    let url = warden.gateway().await;
    let http = reqwest::Client::new();
    let mut alice = operator(&url, "tok-alice").await.expect("alice connects");
    let mut bob = operator(&url, "tok-bob").await.expect("bob connects");
    let before = tree(&http, &admin).await;
    assert_eq!(before["config"]["generation"], 1, "{before}");

    // POST /admin/reload applies the new file.
    write_config(&warden, &file_after);
    let (status, report) = reload(&http, &admin).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["generation"], 2, "{report}");
    assert_eq!(
        report["needs_restart"],
        serde_json::json!(["gateway.bind", "inbox.retention_ms"]),
        "{report}"
    );
    let changes = report["changes"].to_string();
    for expected in [
        "supervision.kinds.gateway_listener.backoff.initial_ms: 30000 → 100",
        "start_slots.approvals.max_concurrent: 3 → 7",
        "kind gateway_listener: backoff.initial_ms 30000 → 100",
        "gateway principals replaced",
    ] {
        assert!(changes.contains(expected), "no {expected:?} in {changes}");
    }
    let line = warden
        .wait_for_log(
            "Config reload: supervision.kinds.gateway_listener.backoff.initial_ms: 30000 → 100.",
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(line["trigger"], "POST /admin/reload", "{line}");

    // Bob's credential is revoked: his session closes with 1008; alice's stays.
    let closed = eventually(
        Duration::from_secs(5),
        "bob's session closed",
        async || match bob.call("health", serde_json::json!({})).await {
            Err(CallError::Closed { code, reason, .. }) => Some((code, reason)),
            _ => None,
        },
    )
    .await;
    assert_eq!(closed.0, 1008, "{closed:?}");
    assert!(closed.1.contains("revoked"), "{closed:?}");
    alice
        .call("health", serde_json::json!({}))
        .await
        .expect("alice's session still answers");
    assert!(operator(&url, "tok-bob").await.is_err(), "bob reconnected");

    // Nothing restarted, the pool grew in place, and the tree shows generation 2.
    let after = tree(&http, &admin).await;
    assert_eq!(generations(&before), generations(&after), "{after}");
    assert_eq!(after["config"]["generation"], 2, "{after}");
    assert_eq!(
        after["config"]["pending_restart"][0], "gateway.bind",
        "{after}"
    );
    // /admin/config shows the file's value and what still runs until a restart.
    let config: Value = http
        .get(format!("{admin}/admin/config"))
        .send()
        .await
        .expect("config")
        .json()
        .await
        .expect("config json");
    let bind_entry = config["entries"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["key"] == "gateway.bind"))
        .expect("gateway.bind");
    assert_eq!(bind_entry["pending_restart"], true, "{bind_entry}");
    assert_eq!(
        bind_entry["running_value"],
        format!("\"127.0.0.1:{port}\""),
        "{bind_entry}"
    );
    assert_eq!(config["generation"], 2, "{config}");
    let slots = tree_node(&after, "root/start_slots").expect("start_slots");
    let pool = slots["pools"]
        .as_array()
        .and_then(|pools| pools.iter().find(|p| p["name"] == "approvals"))
        .expect("the approvals pool");
    assert_eq!(pool["max_concurrent"], 7, "{pool}");

    // The new policy decides the next failure: the listener comes back after 100 ms, not
    // the 30 s it started with; and it still listens where it did.
    let listener = "root/gateway/listener";
    let generation = tree_node(&after, listener).expect("listener")["generation"]
        .as_u64()
        .expect("generation");
    let killed = http
        .post(format!("{admin}/admin/actors/{listener}/kill"))
        .send()
        .await
        .expect("kill");
    assert_eq!(killed.status(), 200);
    eventually(
        Duration::from_secs(3),
        "the listener back by the new backoff",
        async || {
            let tree = tree(&http, &admin).await;
            let node = tree_node(&tree, listener).cloned().unwrap_or_default();
            node["state"] == "running" && node["generation"].as_u64() == Some(generation + 1)
        },
    )
    .await;
    operator(&url, "tok-alice")
        .await
        .expect("the listener is back where it was");

    // SIGHUP reloads too.
    warden.signal("-HUP");
    eventually(
        Duration::from_secs(5),
        "generation 3 after SIGHUP",
        async || tree(&http, &admin).await["config"]["generation"] == 3,
    )
    .await;
    assert!(warden.logs().contains("\"trigger\":\"SIGHUP\""));

    // An invalid file is refused whole with the start-up error; nothing changes.
    write_config(
        &warden,
        &file_after.replace("max_concurrent = 7", "max_concurrent = \"many\""),
    );
    let (status, error) = reload(&http, &admin).await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["code"], "invalid_config", "{error}");
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("start_slots.approvals.max_concurrent") && message.contains("warden.toml"),
        "{message}"
    );
    let unchanged = tree(&http, &admin).await;
    assert_eq!(unchanged["config"]["generation"], 3, "{unchanged}");
    let metrics = http
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.contains("warden_config_reloads_total{result=\"rejected\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("warden_config_generation 3"), "{metrics}");

    // The file it started with, missing or emptied (being written): refused, nothing changes.
    let file = warden.dir().join("warden.toml");
    std::fs::remove_file(&file).expect("remove warden.toml");
    let (status, error) = reload(&http, &admin).await;
    assert_eq!(status, 400, "{error}");
    assert!(error.to_string().contains("warden.toml"), "{error}");
    std::fs::write(&file, "\n").expect("empty warden.toml");
    let (status, error) = reload(&http, &admin).await;
    assert_eq!(status, 400, "{error}");
    assert!(error.to_string().contains("empty"), "{error}");
    assert_eq!(tree(&http, &admin).await["config"]["generation"], 3);

    // A new admin token needs a restart: named, and the running endpoint stays as it is.
    write_config(
        &warden,
        &format!("{file_after}\n[admin]\ntoken = \"new-admin-token\"\n"),
    );
    let (status, report) = reload(&http, &admin).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report["needs_restart"],
        serde_json::json!(["admin.token", "gateway.bind", "inbox.retention_ms"]),
        "{report}"
    );
    assert_eq!(tree(&http, &admin).await["config"]["generation"], 4);

    // No operator credential left: like a start without one, operators get the generated
    // token (in <state.dir>/gateway.token); alice's own is revoked. (Her first session
    // ended with the listener's restart, rest_for_one: a new one.)
    let mut alice = operator(&url, "tok-alice").await.expect("alice connects");
    write_config(
        &warden,
        &file_after.replace("[gateway.operators.alice]\ntoken = \"tok-alice\"\n", ""),
    );
    let (status, report) = reload(&http, &admin).await;
    assert_eq!(status, 200, "{report}");
    let closed = eventually(
        Duration::from_secs(5),
        "alice's session closed",
        async || match alice.call("health", serde_json::json!({})).await {
            Err(CallError::Closed { code, .. }) => Some(code),
            _ => None,
        },
    )
    .await;
    assert_eq!(closed, 1008);
    let generated = std::fs::read_to_string(warden.dir().join(".warden/gateway.token"))
        .expect("the generated operator token");
    operator(&url, generated.trim())
        .await
        .expect("an operator connects with the generated token");

    // `warden reload`: exit 64 naming the key while the file is invalid; then 0.
    write_config(
        &warden,
        &file_after.replace("max_concurrent = 7", "max_concurrent = \"many\""),
    );
    let cli = || Launch::new("reload-cli", &["reload", "--admin", &admin]);
    let out = cli().output(Duration::from_secs(30)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("start_slots.approvals.max_concurrent"),
        "{stderr}"
    );
    write_config(&warden, &file_after);
    let out = cli().output(Duration::from_secs(30)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("config generation 6"), "{stdout}");
    assert!(
        stdout.contains("needs a restart: gateway.bind")
            && stdout.contains("needs a restart: inbox.retention_ms"),
        "{stdout}"
    );
}

/// `path`'s (generation, started_at) in the tree: what moves when it restarts.
async fn incarnation(rig: &Rig, path: &str) -> (Value, Value) {
    let node = rig.tree_node(path).await;
    (node["generation"].clone(), node["started_at"].clone())
}

/// Posts a reload to `rig` and returns its report, which must be 200.
async fn reload_rig(rig: &Rig, scenario: &Scenario) -> Value {
    std::fs::write(rig.warden.dir().join("warden.toml"), scenario.toml()).expect("write");
    let (status, report) = reload(&reqwest::Client::new(), &rig.admin).await;
    assert_eq!(status, 200, "{report}");
    report
}

/// Accounts on a real Synapse: an account added starts alone, one removed stops alone, one
/// whose filters changed restarts alone, and switching approvals off stops only that
/// account's handler. The others keep their incarnation (their sync runs on) and still
/// deliver messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_touches_only_the_accounts_it_changes() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let (nova, vega, lyra) = (
        hs.register("rlnova").await,
        hs.register("rlvega").await,
        hs.register("rllyra").await,
    );
    let owner = hs.register("rlowner").await;
    let base = |accounts: Vec<Account>| {
        Scenario::new("reload-accounts", "reload-token").accounts(accounts)
    };
    let nova_acc = || Account::password("nova", hs.url(), &nova).allow(&owner);
    let vega_acc = || Account::password("vega", hs.url(), &vega).allow(&owner);
    // Lyra with approvals on or off (the same approvers), and with or without a room filter.
    let lyra_acc = |approvals: bool, filtered: bool| {
        let account = Account::password("lyra", hs.url(), &lyra)
            .allow(&owner)
            .line(&format!(
                "approvals = {{ enabled = {approvals}, approvers = [\"{}\"] }}",
                owner.user_id
            ));
        match filtered {
            true => account.line("allowed_rooms = [\"!elsewhere:localhost\"]"),
            false => account,
        }
    };
    let scenario = base(vec![nova_acc(), vega_acc()]);
    let rig = scenario.start().await;
    rig.wait_ready("nova", Duration::from_secs(30)).await;
    rig.wait_ready("vega", Duration::from_secs(30)).await;
    let nova_room = owner.create_room(&[&nova.user_id], false).await;
    let mut op = rig.operator().await;
    op.call("subscribe", json!({"events": ["chat.message"]}))
        .await
        .expect("subscribe");
    let nova_client = "root/channels/matrix/nova/client";
    let vega_client = "root/channels/matrix/vega/client";
    let nova_before = incarnation(&rig, nova_client).await;
    let vega_before = incarnation(&rig, vega_client).await;

    // Added: lyra with an approval handler; nova and vega untouched.
    let report = reload_rig(
        &rig,
        &base(vec![nova_acc(), vega_acc(), lyra_acc(true, false)]),
    )
    .await;
    assert!(
        report["changes"].to_string().contains("account lyra added"),
        "{report}"
    );
    rig.wait_ready("lyra", Duration::from_secs(30)).await;
    rig.wait_handler("lyra", Duration::from_secs(30)).await;
    assert_eq!(incarnation(&rig, nova_client).await, nova_before);
    assert_eq!(incarnation(&rig, vega_client).await, vega_before);
    rig.warden
        .wait_for_log("Config reload: account lyra added.", Duration::from_secs(5))
        .await;

    // Removed: vega stops and leaves the tree; changed: lyra's filters restart lyra alone.
    let lyra_before = incarnation(&rig, "root/channels/matrix/lyra/client").await;
    let report = reload_rig(&rig, &base(vec![nova_acc(), lyra_acc(true, true)])).await;
    let changes = report["changes"].to_string();
    assert!(changes.contains("account vega removed"), "{report}");
    assert!(changes.contains("account lyra restarted"), "{report}");
    assert_eq!(
        rig.tree_node("root/channels/matrix/vega").await,
        Value::Null
    );
    let sent = op
        .call(
            "chat.send",
            json!({"account": "vega", "room_id": nova_room, "body": "x"}),
        )
        .await;
    assert!(
        matches!(&sent, Err(CallError::Failed { code, .. }) if code == "unknown_account"),
        "{sent:?}"
    );
    rig.wait_ready("lyra", Duration::from_secs(30)).await;
    assert_ne!(
        incarnation(&rig, "root/channels/matrix/lyra/client").await,
        lyra_before,
        "lyra restarted with its new filters"
    );
    assert_eq!(incarnation(&rig, nova_client).await, nova_before);

    // Approvals off: lyra's handler stops, its client runs on.
    let lyra_now = incarnation(&rig, "root/channels/matrix/lyra/client").await;
    let report = reload_rig(&rig, &base(vec![nova_acc(), lyra_acc(false, true)])).await;
    assert!(
        report["changes"]
            .to_string()
            .contains("account lyra: approval handler stopped"),
        "{report}"
    );
    assert_eq!(
        rig.tree_node("root/channels/matrix/lyra/approvals").await,
        Value::Null
    );
    assert_eq!(
        incarnation(&rig, "root/channels/matrix/lyra/client").await,
        lyra_now
    );
    assert_eq!(incarnation(&rig, nova_client).await, nova_before);

    // Nova's sync never stopped: a message sent now arrives.
    owner.send_text(&nova_room, "after three reloads").await;
    let message = next_event(&mut op, "chat.message", Duration::from_secs(20))
        .await
        .expect("nova's message");
    assert_eq!(message["account"], "nova", "{message}");
    assert_eq!(message["body"], "after three reloads", "{message}");
}

/// `warden node` does not reload: a SIGHUP (whose default action would end the process) is
/// logged as ignored, and the node runs on.
#[tokio::test]
async fn a_node_says_it_ignores_sighup_and_runs_on() {
    let nowhere = format!("ws://127.0.0.1:{}/ws", free_port());
    let config = format!(
        "{}[node.commands.hello]\nargv = [\"echo\", \"hello\"]\n",
        node_config(&nowhere, "some-token", "quiet")
    );
    let mut node = Launch::node("reload-node", &config).spawn();
    node.admin().await;
    node.signal("-HUP");
    node.wait_for_log(
        "SIGHUP ignored: warden node does not reload its config; restart it to apply a change.",
        Duration::from_secs(5),
    )
    .await;
    assert!(node.is_running(), "{}", node.logs());
}
