//! `promtool check metrics` against live processes: a `warden run` with an operator
//! session, a `warden node` and a Matrix account (with its approval handler) on the test
//! run's Synapse all connected, a refused `connect` and a restart behind it; and that
//! node's own `/metrics`. Every `kind` label the two show is one `supervision.kinds`
//! accepts.
//!
//! Skipped without Synapse or `PROMTOOL` outside CI (`scripts/test.sh` provides both; under
//! `CI=true` a missing one fails).

use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::Value;
use warden::config::KINDS;
use warden_actors::gateway::client::{ConnectOptions, GatewayClient};
use warden_actors::gateway::protocol::{ClientInfo, Role};

use crate::support::{Launch, TempDir, eventually, promtool, promtool_check};
use crate::synapse;

const TOKEN: &str = "metrics-live-token";
const WITHIN: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_metrics_of_a_live_gateway_and_node() -> anyhow::Result<()> {
    let Some(hs) = synapse::require!() else {
        return Ok(());
    };
    let Some(promtool) = promtool()? else {
        eprintln!("skipped: PROMTOOL is unset (scripts/test.sh finds one)");
        return Ok(());
    };
    let (bot, owner) = tokio::join!(hs.register("metricsbot"), hs.register("metricsowner"));

    // The gateway, with one Matrix account that hosts an approval handler.
    let state = TempDir::new("metrics-live-state");
    let config = format!(
        "[matrix.accounts.nova]\nhomeserver = \"{url}\"\nuser_id = \"{bot}\"\npassword = \"{pw}\"\n\
         allowed_senders = [\"{owner}\"]\napprovals = {{ enabled = true, approvers = [\"{owner}\"] }}\n",
        url = hs.url(),
        bot = bot.user_id,
        pw = bot.password,
        owner = owner.user_id
    );
    let state_dir = state.path().to_str().context("utf-8 path")?.to_string();
    let gateway = Launch::run("metrics-live-gw")
        .config(&config)
        .envs(&[
            ("WARDEN_GATEWAY__TOKEN", TOKEN),
            ("WARDEN_GATEWAY__ALLOW_UNLISTED_NODES", "true"),
            ("WARDEN_STATE__DIR", &state_dir),
        ])
        .spawn();
    let admin = gateway.admin().await;
    let url = gateway.gateway().await;

    // A node host, and an operator session.
    let node_config = format!(
        "[node]\ngateway_url = \"{url}\"\ntoken = \"{TOKEN}\"\nname = \"metrics-node\"\n\
         [node.commands.hello]\nargv = [\"echo\", \"hello\"]\n"
    );
    let node = Launch::node("metrics-live-node", &node_config).spawn();
    let node_admin = node.admin().await;
    let http = reqwest::Client::new();
    let client = ClientInfo {
        name: "it-metrics".into(),
        version: "0".into(),
    };
    let options = ConnectOptions::new(Role::Operator, TOKEN, client.clone());
    let (operator, _) = GatewayClient::connect(&url, options).await?;
    // A refused connect, and a restart (counted, with its backoff delay).
    let wrong = ConnectOptions::new(Role::Operator, "not-the-token", client);
    ensure!(
        GatewayClient::connect(&url, wrong).await.is_err(),
        "a wrong token connected"
    );
    let killed = http
        .post(format!("{admin}/admin/actors/root/start_slots/kill"))
        .send()
        .await?;
    ensure!(killed.status().is_success(), "kill: {}", killed.status());

    // Everything connected: a session of each role, the account synced, the restart done.
    let what =
        gateway.with_logs("a session of each role, the account ready, start_slots restarted");
    let text = eventually(WITHIN, what, async || {
        let text = http
            .get(format!("{admin}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let tree: Value = http
            .get(format!("{admin}/admin/tree"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let ready = find(&tree, "root/channels/matrix/nova/client")
            .is_some_and(|client| client["ready"] == true);
        let roles = ["operator", "node", "approver"];
        let sessions = roles
            .iter()
            .all(|role| text.contains(&format!("warden_gateway_sessions{{role=\"{role}\"}} 1")));
        let restarted = text.contains("warden_restarts_total{kind=\"start_slots\"")
            && text.contains("warden_children{kind=\"start_slots\",state=\"running\"} 1");
        (ready && sessions && restarted).then_some(text)
    })
    .await;
    promtool_check(&promtool, "warden run", &text).await?;

    let node_text = http
        .get(format!("{node_admin}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        node_text.contains("warden_children{kind=\"node_connection\",state=\"running\"} 1"),
        "{node_text}"
    );
    promtool_check(&promtool, "warden node", &node_text).await?;

    for (what, text) in [("warden run", &text), ("warden node", &node_text)] {
        for kind in kind_labels(text) {
            ensure!(
                KINDS.contains(&kind.as_str()),
                "{what} shows kind {kind:?}, which has no built-in policy (KINDS: {KINDS:?})"
            );
        }
    }

    operator.close().await;
    Ok(())
}

/// Every value of a `kind` label in a scrape.
fn kind_labels(text: &str) -> Vec<String> {
    text.split("kind=\"")
        .skip(1)
        .filter_map(|rest| rest.split_once('"').map(|(kind, _)| kind.to_string()))
        .collect()
}

fn find<'a>(node: &'a Value, path: &str) -> Option<&'a Value> {
    if node["path"] == path {
        return Some(node);
    }
    node["children"]
        .as_array()?
        .iter()
        .find_map(|c| find(c, path))
}
