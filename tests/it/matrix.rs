//! Matrix accounts against a real Synapse (the test run's, or a private one), with the
//! fault proxy between warden and the homeserver where a test injects failures.
//!
//! Each test registers its own users and rooms, so they run in parallel on one Synapse.
//! Operators are real gateway clients subscribed to `chat.message`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use warden_actors::gateway::client::{CallError, GatewayClient};

use crate::fault_proxy::{FaultProxy, Mode};
use crate::support::{
    Account, Launch, Rig, Scenario, Warden, eventually, free_port, next_event, node_config,
    poll_json,
};
use crate::synapse::{self, EncryptedPeer, Synapse, User};

const TOKEN: &str = "matrix-test-token";

/// The `warden run` of test `name`, its operators authenticated with [`TOKEN`].
fn scenario(name: &str) -> Scenario {
    Scenario::new(&format!("matrix-{name}"), TOKEN)
}

/// The next `chat.message` payload, or None at the deadline.
async fn next_message(op: &mut GatewayClient, deadline: Instant) -> Option<Value> {
    let left = deadline.saturating_duration_since(Instant::now());
    next_event(op, "chat.message", left).await
}

/// Collects `chat.message` payloads until `done` says so, or panics at the deadline.
async fn collect(
    rig: &Rig,
    op: &mut GatewayClient,
    within: Duration,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while !done(&got) {
        match next_message(op, deadline).await {
            Some(m) => got.push(m),
            None => panic!(
                "timed out after {within:?} with {} messages: {:?}\nwarden's logs:\n{}",
                got.len(),
                got.iter().map(|m| m["body"].clone()).collect::<Vec<_>>(),
                rig.warden.logs()
            ),
        }
    }
    got
}

/// A room of `owner` that `bot` joined by accepting the invite itself (auto_join).
async fn room_with(owner: &User, bot: &User, encrypted: bool) -> String {
    let room = owner.create_room(&[&bot.user_id], encrypted).await;
    owner
        .wait_joined(&room, &bot.user_id, Duration::from_secs(30))
        .await;
    room
}

/// Once warden has connected to `proxy` (stalling), forwards again and resets the held
/// connections; returns how many there were.
async fn reset_the_held(proxy: &FaultProxy) -> usize {
    let connected = async || proxy.accepted() > 0;
    let what = "warden connects to the proxy";
    eventually(Duration::from_secs(20), what, connected).await;
    proxy.set_mode(Mode::Forward).await;
    proxy.reset_all().await
}

/// Waits until `nova` is ready and has said it wiped its local state; returns that log line.
async fn ready_after_a_wipe(rig: &Rig) -> Value {
    rig.wait_ready("nova", Duration::from_secs(30)).await;
    let wiped = "The local Matrix state is unusable; wiping it and logging in fresh.";
    rig.warden.wait_for_log(wiped, Duration::from_secs(5)).await
}

fn session_file(state: &Path, alias: &str) -> PathBuf {
    state.join("matrix").join(alias).join("session.json")
}

/// Scenario 1: a reset during the startup login is retried, and the account comes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_during_startup_login_is_retried_and_the_account_comes_up() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let bot = hs.register("s1bot").await;
    let proxy = FaultProxy::start(hs.addr()).await.expect("proxy");
    proxy.set_mode(Mode::Stall).await;
    let rig = scenario("s1")
        .account(Account::password("nova", &proxy.url(), &bot))
        .start()
        .await;
    // The login's connection is held; then reset, and let the retry through.
    assert!(reset_the_held(&proxy).await >= 1, "a connection was reset");
    let node = rig.wait_ready("nova", Duration::from_secs(30)).await;
    assert!(node["restarts_total"].as_u64() >= Some(1), "{node:#}");
    let reason = node["last_failure"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("connection reset by peer"), "{node:#}");
    assert_eq!(node["last_failure"]["class"], "transient");
    assert!(proxy.count("/login") >= 1);
}

/// Scenario 1, token variant: a reset during the `whoami` a token without `user_id` needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_during_startup_whoami_is_retried_and_the_account_comes_up() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let bot = hs.register("s1who").await;
    let (token, _device) = bot.login_fresh().await;
    let proxy = FaultProxy::start(hs.addr()).await.expect("proxy");
    proxy.set_mode(Mode::Stall).await;
    let rig = scenario("s1who")
        .account(Account::token("nova", &proxy.url(), &token))
        .start()
        .await;
    assert!(reset_the_held(&proxy).await >= 1);
    let node = rig.wait_ready("nova", Duration::from_secs(30)).await;
    assert!(node["restarts_total"].as_u64() >= Some(1), "{node:#}");
    assert!(proxy.count("/whoami") >= 1, "{:?}", proxy.requests());
}

/// Scenario 2: resets every 2 s for 30 s during sync while another user sends 100
/// messages: the account never parks and the operator gets each message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_every_two_seconds_lose_and_repeat_no_message() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let bot = hs.register("s2bot").await;
    let owner = hs.register("s2owner").await;
    let proxy = FaultProxy::start(hs.addr()).await.expect("proxy");
    let rig = scenario("s2")
        .account(Account::password("nova", &proxy.url(), &bot).allow(&owner))
        .start()
        .await;
    rig.wait_ready("nova", Duration::from_secs(30)).await;
    let room = room_with(&owner, &bot, false).await;
    let mut op = rig.operator().await;

    let started = Instant::now();
    let proxy = std::sync::Arc::new(proxy);
    let resets = {
        let proxy_resets = tokio::spawn({
            let proxy = proxy.clone();
            async move {
                let mut total = 0;
                let mut tick = tokio::time::interval(Duration::from_secs(2));
                tick.tick().await;
                for _ in 0..15 {
                    tick.tick().await;
                    total += proxy.reset_all().await;
                }
                total
            }
        });
        let sender = tokio::spawn({
            let (owner, room) = (owner.clone(), room.clone());
            async move {
                for i in 0..100 {
                    owner.send_text(&room, &format!("msg {i:03}")).await;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        });
        let got = collect(&rig, &mut op, Duration::from_secs(150), |got| {
            got.len() >= 100
        })
        .await;
        sender.await.expect("sender");
        let resets = proxy_resets.await.expect("resets");
        let bodies: Vec<String> = got
            .iter()
            .map(|m| m["body"].as_str().unwrap_or_default().to_string())
            .collect();
        let expected: Vec<String> = (0..100).map(|i| format!("msg {i:03}")).collect();
        assert_eq!(bodies, expected, "every message once, in order");
        // Nothing more arrives: no late duplicate.
        let extra = next_message(&mut op, Instant::now() + Duration::from_secs(3)).await;
        assert!(extra.is_none(), "a duplicate arrived: {extra:?}");
        resets
    };
    let node = rig.client_node("nova").await;
    eprintln!(
        "scenario 2: 100 messages in {:.1} s, {resets} connections reset, {} restarts",
        started.elapsed().as_secs_f64(),
        node["restarts_total"]
    );
    // Backoff grows (1, 2, 4, 8 … s) while the resets go on, so later resets often find
    // the account waiting rather than connected.
    assert!(resets >= 3, "the resets hit open connections: {resets}");
    assert!(node["restarts_total"].as_u64() >= Some(3), "{node:#}");
    assert!(
        !rig.warden.logs().contains("\"Parked"),
        "the account parked:\n{}",
        rig.warden.logs()
    );
    assert_eq!(node["state"], "running", "{node:#}");
}

/// Scenario 3: Synapse down for 60 s. The tree shows backing_off with the cause; the
/// account is ready within its backoff cap after Synapse is back; messages sent while the
/// account was away are all forwarded, and a send during the outage is refused, not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synapse_down_for_a_minute_backs_off_then_recovers_without_loss() {
    let Some(_) = synapse::require!() else { return };
    let hs = Synapse::start_private("s3").await;
    let bot = hs.register("s3bot").await;
    let owner = hs.register("s3owner").await;
    let rig = scenario("s3")
        .account(Account::password("nova", hs.url(), &bot).allow(&owner))
        .start()
        .await;
    rig.wait_ready("nova", Duration::from_secs(30)).await;
    let room = room_with(&owner, &bot, false).await;
    let mut op = rig.operator().await;
    owner.send_text(&room, "before").await;
    let got = collect(&rig, &mut op, Duration::from_secs(20), |g| !g.is_empty()).await;
    assert_eq!(got[0]["body"], "before");

    hs.stop().await;
    let down_at = Instant::now();
    let node = rig
        .wait_client("nova", Duration::from_secs(60), |n| {
            n["state"] == "backing_off" && n["last_failure"]["reason"].is_string()
        })
        .await;
    let reason = node["last_failure"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("connection refused") || reason.contains("connection reset"),
        "{node:#}"
    );
    assert!(node["next_restart_in_ms"].is_u64(), "{node:#}");
    let refused = rig
        .chat_send(json!({"account": "nova", "room_id": room, "body": "during outage"}))
        .await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("account_not_ready")),
        "{refused:?}"
    );
    // The outage itself: Synapse stays down 60 s. The operator keeps reading (its session
    // would idle out otherwise) and gets nothing.
    let quiet = next_message(&mut op, down_at + Duration::from_secs(60)).await;
    assert!(quiet.is_none(), "a message during the outage: {quiet:?}");

    hs.start_again().await;
    let back_at = Instant::now();
    for i in 0..5 {
        owner.send_text(&room, &format!("while away {i}")).await;
    }
    rig.wait_ready("nova", Duration::from_secs(70)).await;
    let recovered = back_at.elapsed();
    let got = collect(&rig, &mut op, Duration::from_secs(30), |g| g.len() >= 5).await;
    let bodies: Vec<&str> = got.iter().filter_map(|m| m["body"].as_str()).collect();
    assert_eq!(
        bodies,
        [
            "while away 0",
            "while away 1",
            "while away 2",
            "while away 3",
            "while away 4"
        ]
    );
    eprintln!(
        "scenario 3: ready {:.1} s after Synapse came back (cap 60 s)",
        recovered.as_secs_f64()
    );
    assert!(recovered <= Duration::from_secs(62), "{recovered:?}");
}

/// Scenario 4: a wrong password parks that account with a fatal reason; two healthy
/// accounts keep syncing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_parks_one_account_and_the_others_keep_syncing() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let bad = hs.register("s4bad").await;
    let good1 = hs.register("s4good").await;
    let good2 = hs.register("s4good").await;
    let owner = hs.register("s4owner").await;
    let rig = scenario("s4")
        .account(Account::wrong_password("bad", hs.url(), &bad))
        .account(Account::password("good1", hs.url(), &good1).allow(&owner))
        .account(Account::password("good2", hs.url(), &good2).allow(&owner))
        .start()
        .await;
    let node = rig
        .wait_client("bad", Duration::from_secs(30), |n| n["state"] == "parked")
        .await;
    assert_eq!(node["last_failure"]["class"], "fatal", "{node:#}");
    let reason = node["last_failure"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("login refused") && reason.contains("M_FORBIDDEN"),
        "{reason}"
    );
    assert_eq!(node["restarts_total"], 0, "a fatal failure is not retried");

    rig.wait_ready("good1", Duration::from_secs(30)).await;
    rig.wait_ready("good2", Duration::from_secs(30)).await;
    let room1 = room_with(&owner, &good1, false).await;
    let room2 = room_with(&owner, &good2, false).await;
    let mut op = rig.operator().await;
    owner.send_text(&room1, "to good1").await;
    owner.send_text(&room2, "to good2").await;
    let got = collect(&rig, &mut op, Duration::from_secs(20), |g| g.len() >= 2).await;
    let mut pairs: Vec<(String, String)> = got
        .iter()
        .map(|m| (m["account"].to_string(), m["body"].to_string()))
        .collect();
    pairs.sort();
    assert_eq!(
        pairs,
        [
            ("\"good1\"".to_string(), "\"to good1\"".to_string()),
            ("\"good2\"".to_string(), "\"to good2\"".to_string())
        ]
    );
    let ready = poll_json(
        &format!("{}/readyz", rig.admin),
        Duration::from_secs(5),
        |s, _| s == 503,
    )
    .await;
    assert_eq!(ready["failing"], json!(["root/channels/matrix/bad/client"]));
}

/// Who is typing in a room, as a person's client follows it: incremental syncs (Synapse
/// caches a repeated initial sync for minutes), the last `m.typing` seen.
struct Typing<'a> {
    user: &'a User,
    room_id: &'a str,
    since: Option<String>,
    typing: Vec<String>,
}

impl<'a> Typing<'a> {
    fn new(user: &'a User, room_id: &'a str) -> Self {
        Self {
            user,
            room_id,
            since: None,
            typing: Vec::new(),
        }
    }

    /// Syncs once more; returns who types now.
    async fn now(&mut self) -> Vec<String> {
        let mut query = vec![("timeout", "0")];
        if let Some(since) = &self.since {
            query.push(("since", since.as_str()));
        }
        let (status, sync) = self
            .user
            .api(reqwest::Method::GET, &["sync"], &query, None, None)
            .await
            .expect("sync");
        assert_eq!(status, 200, "{sync}");
        self.since = sync["next_batch"].as_str().map(str::to_string);
        let events = sync["rooms"]["join"][self.room_id]["ephemeral"]["events"].clone();
        for event in events.as_array().into_iter().flatten() {
            if event["type"] == "m.typing" {
                self.typing = event["content"]["user_ids"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|u| u.as_str().map(str::to_string))
                    .collect();
            }
        }
        self.typing.clone()
    }
}

/// Issue 14: the homeserver rate-limits the account (1 message a second, bursts of 1, for
/// its user alone). Each `chat.send` still succeeds, sent again after the 429's
/// `retry_after`, and sends to one room keep their order: a send that arrives while an
/// earlier one waits out its 429 goes after it, not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_send_is_sent_again_after_retry_after_in_order() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let bot = hs.register("rlbot").await;
    let owner = hs.register("rlowner").await;
    let admin = hs.register_admin("rladmin").await;
    let rig = scenario("rl")
        .account(Account::password("nova", hs.url(), &bot).allow(&owner))
        .start()
        .await;
    rig.wait_ready("nova", Duration::from_secs(30)).await;
    let room = room_with(&owner, &bot, false).await;
    admin.limit_messages(&bot, 1, 1).await;
    // The rate-limit log names each send by its txn_id.
    let limited = |txn: &str| {
        rig.warden
            .logs_of("Rate limited by the homeserver; sending again after its retry_after.")
            .iter()
            .filter(|v| txn.is_empty() || v["send"] == txn)
            .count()
    };
    let send = |i: usize| {
        let gateway = rig.gateway.clone();
        let params = json!({"account": "nova", "room_id": room, "body": format!("rl {i}"),
            "format": "plain", "txn_id": format!("rl-{i}")});
        tokio::spawn(async move {
            let mut op = crate::support::operator(&gateway, TOKEN)
                .await
                .map_err(|e| e.to_string())?;
            op.call("chat.send", params)
                .await
                .map_err(|e| e.to_string())
        })
    };

    // The first send takes the burst. Each later one is asked once the one before it is at
    // the account, waiting out a 429 of its own: it arrives while that one waits.
    let started = Instant::now();
    let first = send(0).await.expect("task");
    assert!(first.is_ok(), "{first:?}");
    let mut sends = Vec::new();
    for i in 1..4 {
        sends.push(send(i));
        let what = rig.warden.with_logs(format!("send rl-{i} rate limited"));
        let txn = format!("rl-{i}");
        eventually(Duration::from_secs(20), what, async || limited(&txn) > 0).await;
    }
    for (i, sent) in sends.into_iter().enumerate() {
        let answer = sent.await.expect("task");
        assert!(answer.is_ok(), "send {} failed: {answer:?}", i + 1);
    }
    let took = started.elapsed();
    assert!(limited("") >= 3, "only {} 429s", limited(""));
    let timeline: Vec<String> = owner
        .messages(&room, 50)
        .await
        .into_iter()
        .filter_map(|m| m.body.filter(|b| b.starts_with("rl ")))
        .collect();
    assert_eq!(
        timeline,
        ["rl 0", "rl 1", "rl 2", "rl 3"],
        "the room's order"
    );
    eprintln!(
        "4 sends at 1 msg/s: {} times rate limited, all delivered in order in {} ms",
        limited(""),
        took.as_millis()
    );
}

/// Issue 14: a configured `device_id` that differs from the saved session's device is
/// reported once (a WARN naming both) and the saved session is kept — same device, same
/// E2EE store, no new login — across a restart of warden and a restart of the client; the
/// account keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drifted_device_id_is_reported_once_and_the_saved_session_kept() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let bot = hs.register("driftbot").await;
    let owner = hs.register("driftowner").await;
    let base = scenario("drift");
    let account = || Account::password("nova", hs.url(), &bot).allow(&owner);
    let mut rig = base.clone().account(account()).start().await;
    rig.wait_ready("nova", Duration::from_secs(30)).await;
    let login = rig
        .warden
        .wait_for_log("Logged in to Matrix.", Duration::from_secs(10))
        .await;
    let device = login["device"].as_str().expect("device").to_string();
    rig.warden.signal("-TERM");
    rig.warden.wait_exit(Duration::from_secs(20)).await;

    let drifted = base.account(account().line("device_id = \"DRIFTED\""));
    let rig = drifted.start().await;
    rig.wait_ready("nova", Duration::from_secs(30)).await;
    const WARNING: &str = "The configured device_id differs from the saved session's device; keeping the saved session and its device (its E2EE keys are that device's). To use the configured device, stop warden and remove the account's directory under state.dir.";
    let warned = rig
        .warden
        .wait_for_log(WARNING, Duration::from_secs(10))
        .await;
    assert_eq!(
        (
            warned["level"].as_str(),
            warned["configured"].as_str(),
            warned["saved"].as_str()
        ),
        (Some("WARN"), Some("DRIFTED"), Some(device.as_str())),
        "{warned}"
    );
    let restored = rig
        .warden
        .log("Restored the Matrix session.")
        .expect("restored");
    assert_eq!(restored["device"], device.as_str(), "{restored}");
    assert!(
        rig.warden.log("Logged in to Matrix.").is_none(),
        "logged in anew"
    );

    // A restart of the client warns no more.
    rig.restart_client("nova", Duration::from_secs(30)).await;
    assert_eq!(
        rig.warden.logs_of(WARNING).len(),
        1,
        "warned once per account"
    );
    // The account still sends (once its own sync has seen the join).
    let room = room_with(&owner, &bot, false).await;
    let params = json!({"account": "nova", "room_id": room, "body": "still here"});
    eventually(
        Duration::from_secs(20),
        "a send through the kept session",
        async || rig.chat_send(params.clone()).await.ok(),
    )
    .await;
}

/// Issue 14: a one-time-key conflict seen while running (not at start) wipes the state and
/// logs in fresh, with a password configured. The conflict is made the way a restored
/// backup of the crypto store makes it: the homeserver holds an unclaimed one-time key
/// under the id the account's store will use next (uploaded here with the account's own
/// token), and two claims make the account top its keys up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_time_key_conflict_while_running_wipes_and_logs_in_fresh() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let bot = hs.register("otkbot").await;
    let owner = hs.register("otkowner").await;
    let scenario = scenario("otk").account(Account::password("nova", hs.url(), &bot).allow(&owner));
    let rig = scenario.start().await;
    rig.wait_ready("nova", Duration::from_secs(30)).await;
    let room = room_with(&owner, &bot, false).await;
    let session_file = scenario.state().join("matrix/nova/session.json");
    let session: Value =
        serde_json::from_slice(&std::fs::read(&session_file).expect("session.json")).expect("json");
    let (device, token) = (
        session["device_id"]
            .as_str()
            .expect("device_id")
            .to_string(),
        session["access_token"]
            .as_str()
            .expect("access_token")
            .to_string(),
    );
    // The account published keys 0..49; the next it makes is key 50 (`AAAAAAAAADI`).
    let counts = |reply: &Value| reply["one_time_key_counts"]["signed_curve25519"].as_u64();
    let (status, reply) = bot
        .api(
            reqwest::Method::POST,
            &["keys", "upload"],
            &[],
            Some(json!({})),
            Some(&token),
        )
        .await
        .expect("keys/upload");
    assert_eq!((status, counts(&reply)), (200, Some(50)), "{reply}");
    let fake = json!({"one_time_keys": {"signed_curve25519:AAAAAAAAADI": {
        "key": "zKbLg+NrIjpnagy+pIY6uPL4ZwEG2v+8F9lmgsnlZzs",
        "signatures": {bot.user_id.as_str(): {format!("ed25519:{device}"): "not checked"}},
    }}});
    let (status, reply) = bot
        .api(
            reqwest::Method::POST,
            &["keys", "upload"],
            &[],
            Some(fake),
            Some(&token),
        )
        .await
        .expect("keys/upload");
    assert_eq!((status, counts(&reply)), (200, Some(51)), "{reply}");
    for _ in 0..2 {
        let claim = json!({"one_time_keys": {bot.user_id.as_str(): {device.as_str(): "signed_curve25519"}}});
        let (status, reply) = owner
            .api(
                reqwest::Method::POST,
                &["keys", "claim"],
                &[],
                Some(claim),
                None,
            )
            .await
            .expect("keys/claim");
        assert_eq!(status, 200, "{reply}");
    }
    // A message ends the account's long poll; the sync's key upload then conflicts.
    owner.send_text(&room, "wake up").await;
    let conflict = rig
        .warden
        .wait_for_log("Restarting after failure.", Duration::from_secs(60))
        .await;
    assert!(
        conflict["error"]
            .as_str()
            .unwrap_or_default()
            .contains("one-time-key conflict while running"),
        "{conflict}"
    );
    let wiped = rig
        .warden
        .wait_for_log(
            "The local Matrix state is unusable; wiping it and logging in fresh.",
            Duration::from_secs(30),
        )
        .await;
    assert!(
        wiped["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("one-time keys"),
        "{wiped}"
    );
    let fresh = eventually(Duration::from_secs(30), "a fresh login", async || {
        rig.warden
            .logs_of("Logged in to Matrix.")
            .into_iter()
            .nth(1)
    })
    .await;
    assert_ne!(fresh["device"], device.as_str(), "a new device: {fresh}");
    rig.wait_ready("nova", Duration::from_secs(30)).await;
}

/// Issue 14: `recovery_key` is applied on every start whose secrets are missing, a restored
/// session included, not only after a fresh login. The account's secret storage, cross-signing
/// and key backup are made by another device of the bot (matrix-sdk in the test). warden first
/// starts with a wrong key: the WARN names the step that failed and never the key. Restarted
/// with the right key on its saved session, it imports the secrets, and its device becomes
/// cross-signed by its owner, as another device sees over the homeserver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recovery_key_is_applied_on_a_restored_session_whose_secrets_are_missing() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let bot = hs.register("recbot").await;
    let other = EncryptedPeer::login(&bot).await;
    let encryption = other.client.encryption();
    encryption.wait_for_e2ee_initialization_tasks().await;
    encryption
        .bootstrap_cross_signing_if_needed(None)
        .await
        .expect("cross-signing bootstrapped (Synapse asks no UIA for the first keys)");
    let key = encryption
        .recovery()
        .enable()
        .await
        .expect("recovery enabled");

    let base = scenario("recovery");
    let wrong = "EsTj wrongwrong wrongwrong not a key";
    let account = |key: &str| {
        Account::password("nova", hs.url(), &bot).line(&format!("recovery_key = \"{key}\""))
    };
    let mut rig = base.clone().account(account(wrong)).start().await;
    rig.wait_ready("nova", Duration::from_secs(30)).await;
    let failed = rig
        .warden
        .wait_for_log(
            "Could not recover the account's secrets with the recovery key; encrypted history stays unreadable until it is fixed.",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(failed["step"], "checking the recovery key", "{failed}");
    assert!(
        !rig.warden.logs().contains("wrongwrong"),
        "the key reached the logs"
    );
    let login = rig
        .warden
        .log("Logged in to Matrix.")
        .expect("a fresh login");
    let device = login["device"].as_str().expect("device").to_string();
    rig.warden.signal("-TERM");
    rig.warden.wait_exit(Duration::from_secs(20)).await;

    let bot_id = matrix_sdk::ruma::UserId::parse(bot.user_id.as_str()).expect("user id");
    let cross_signed = async || {
        encryption
            .request_user_identity(&bot_id)
            .await
            .expect("keys/query");
        let device_id: &matrix_sdk::ruma::DeviceId = device.as_str().into();
        encryption
            .get_device(&bot_id, device_id)
            .await
            .expect("device")
            .is_some_and(|d| d.is_cross_signed_by_owner())
    };
    assert!(
        !cross_signed().await,
        "warden's device is cross-signed before any recovery"
    );

    let rig = base.account(account(&key)).start().await;
    rig.wait_ready("nova", Duration::from_secs(30)).await;
    let restored = rig
        .warden
        .log("Restored the Matrix session.")
        .expect("restored");
    assert_eq!(restored["device"], device.as_str(), "{restored}");
    rig.warden
        .wait_for_log(
            "Recovered the account's secrets with the recovery key.",
            Duration::from_secs(30),
        )
        .await;
    eventually(
        Duration::from_secs(30),
        "warden's device cross-signed by its owner",
        async || cross_signed().await.then_some(()),
    )
    .await;
    assert!(
        !rig.warden.logs().contains(key.as_str()),
        "the key reached the logs"
    );
}

/// What an agent does besides sending, as a person's client sees it: `chat.react` puts a
/// reaction on the person's message, `chat.edit` replaces the agent's own message
/// (`m.replace`, Markdown rendered), `format: "plain"` sends text as typed, `chat.typing`
/// shows and hides the typing notice; bad params are named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reacts_edits_and_types() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let bot = hs.register("actbot").await;
    let owner = hs.register("actowner").await;
    let rig = scenario("act")
        .account(Account::password("nova", hs.url(), &bot).allow(&owner))
        .start()
        .await;
    rig.wait_ready("nova", Duration::from_secs(30)).await;
    let room = room_with(&owner, &bot, false).await;
    let mut op = rig.connect().await.expect("operator connects");
    let within = Duration::from_secs(10);

    // A reaction on the person's message.
    let asked = owner.send_text(&room, "can you check the disk?").await;
    let reacted = op
        .call(
            "chat.react",
            json!({"account": "nova", "room_id": room, "event_id": asked, "key": "👀"}),
        )
        .await
        .expect("chat.react");
    let reaction = owner
        .wait_for_message(
            &room,
            |m| m.reaction() == Some((asked.as_str(), "👀")),
            within,
        )
        .await;
    assert_eq!(reaction.sender, bot.user_id);
    assert_eq!(reacted["event_id"], reaction.event_id.as_str());

    // A reply streamed into one message: sent, then replaced.
    let sent = op
        .call(
            "chat.send",
            json!({"account": "nova", "room_id": room, "body": "checking…"}),
        )
        .await
        .expect("chat.send");
    let first = sent["event_id"].as_str().expect("event_id").to_string();
    let edited = op
        .call(
            "chat.edit",
            json!({"account": "nova", "room_id": room, "event_id": first, "body": "the disk is **41%** full"}),
        )
        .await
        .expect("chat.edit");
    let edit_id = edited["event_id"].as_str().expect("event_id").to_string();
    let edit = owner
        .wait_for_message(&room, |m| m.event_id == edit_id, within)
        .await;
    // Markdown by default: the HTML for clients that show it, the text kept as the body.
    let new = &edit.content["m.new_content"];
    assert_eq!(
        new["body"], "the disk is **41%** full",
        "{:?}",
        edit.content
    );
    assert_eq!(
        new["format"], "org.matrix.custom.html",
        "{:?}",
        edit.content
    );
    assert_eq!(
        new["formatted_body"],
        "the disk is <strong>41%</strong> full"
    );
    assert_eq!(edit.content["m.relates_to"]["rel_type"], "m.replace");
    assert_eq!(edit.content["m.relates_to"]["event_id"], first.as_str());
    // `format: "plain"` sends the text as it is.
    let plain = op
        .call(
            "chat.send",
            json!({"account": "nova", "room_id": room, "body": "**as typed**", "format": "plain"}),
        )
        .await
        .expect("chat.send plain");
    let plain_id = plain["event_id"].as_str().expect("event_id").to_string();
    let seen = owner
        .wait_for_message(&room, |m| m.event_id == plain_id, within)
        .await;
    assert_eq!(seen.body.as_deref(), Some("**as typed**"));
    assert_eq!(
        seen.content.get("formatted_body"),
        None,
        "{:?}",
        seen.content
    );

    // Typing on, then off.
    let on = op
        .call(
            "chat.typing",
            json!({"account": "nova", "room_id": room, "typing": true, "timeout_ms": 30000}),
        )
        .await
        .expect("chat.typing on");
    assert_eq!(on, json!({}));
    let mut typing = Typing::new(&owner, &room);
    eventually(within, "the owner sees the agent typing", async || {
        typing.now().await.contains(&bot.user_id)
    })
    .await;
    op.call(
        "chat.typing",
        json!({"account": "nova", "room_id": room, "typing": false}),
    )
    .await
    .expect("chat.typing off");
    eventually(
        within,
        "the owner no longer sees the agent typing",
        async || !typing.now().await.contains(&bot.user_id),
    )
    .await;

    // Bad params are named; an unknown account or a room not joined too.
    let refused = |result: Result<Value, CallError>| match result {
        Err(CallError::Failed { code, message }) => (code, message),
        other => panic!("not refused: {other:?}"),
    };
    let base = json!({"account": "nova", "room_id": room, "event_id": asked});
    let with = |extra: Value| {
        let mut params = base.clone();
        for (k, v) in extra.as_object().expect("an object") {
            params[k] = v.clone();
        }
        params
    };
    let (code, message) = refused(op.call("chat.react", with(json!({"key": ""}))).await);
    assert_eq!(code, "bad_request");
    assert!(message.contains("field `key`"), "{message}");
    let (code, message) = refused(
        op.call(
            "chat.typing",
            json!({"account": "nova", "room_id": room, "typing": true, "timeout_ms": 999_999}),
        )
        .await,
    );
    assert_eq!(code, "bad_request");
    assert!(message.contains("timeout_ms"), "{message}");
    let (code, _) = refused(
        op.call("chat.react", with(json!({"account": "nobody", "key": "x"})))
            .await,
    );
    assert_eq!(code, "unknown_account");
    let elsewhere = owner.create_room(&[], false).await;
    let (code, message) = refused(
        op.call(
            "chat.edit",
            with(json!({"room_id": elsewhere, "body": "x"})),
        )
        .await,
    );
    assert_eq!(code, "forbidden");
    assert!(message.contains("not in room"), "{message}");
}

/// `mention_only`: in a room of three, a message that does not mention the account is not
/// forwarded; one that names its user ID, lists it in `m.mentions` or names its display
/// name is (`mentioned`); in a direct chat everything is (`is_direct`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mention_only_forwards_mentions_and_direct_chats() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let bot = hs.register("mobot").await;
    let owner = hs.register("moowner").await;
    let third = hs.register("mothird").await;
    let rig = scenario("mention")
        .account(
            Account::password("nova", hs.url(), &bot)
                .allow(&owner)
                .line("mention_only = true"),
        )
        .start()
        .await;
    rig.wait_ready("nova", Duration::from_secs(30)).await;
    let group = room_with(&owner, &bot, false).await;
    owner.invite(&group, &third.user_id).await;
    third.join(&group).await;
    owner
        .wait_joined(&group, &third.user_id, Duration::from_secs(30))
        .await;
    let mut op = rig.operator().await;

    // Sent first: were it forwarded, it would arrive first.
    owner.send_text(&group, "nobody in particular").await;
    owner
        .send_text(&group, &format!("{} can you look?", bot.user_id))
        .await;
    owner
        .send(
            &group,
            "m.room.message",
            json!({"msgtype": "m.text", "body": "ping", "m.mentions": {"user_ids": [bot.user_id]}}),
        )
        .await;
    owner
        .send_text(&group, &format!("thanks {}", bot.localpart))
        .await;
    let dm = owner.create_dm(&bot.user_id, false).await;
    owner
        .wait_joined(&dm, &bot.user_id, Duration::from_secs(30))
        .await;
    owner.send_text(&dm, "just between us").await;

    let got = collect(&rig, &mut op, Duration::from_secs(30), |g| g.len() >= 4).await;
    let seen: Vec<(String, bool, bool)> = got
        .iter()
        .map(|m| {
            (
                m["body"].as_str().unwrap_or_default().to_string(),
                m["mentioned"] == true,
                m["is_direct"] == true,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (format!("{} can you look?", bot.user_id), true, false),
            ("ping".to_string(), true, false),
            (format!("thanks {}", bot.localpart), true, false),
            ("just between us".to_string(), false, true),
        ]
    );
}

/// Scenario 5: token auth with `user_id` and `device_id` set makes no `whoami` (and no
/// login) before its first sync; without `user_id` it makes exactly one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_with_user_id_makes_no_whoami() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let bot = hs.register("s5bot").await;
    let other = hs.register("s5oth").await;
    let (token, device) = bot.login_fresh().await;
    let (token2, _) = other.login_fresh().await;
    let proxy = FaultProxy::start(hs.addr()).await.expect("proxy");
    let proxy2 = FaultProxy::start(hs.addr()).await.expect("proxy");
    let scenario = scenario("s5")
        .account(
            Account::token("nova", &proxy.url(), &token)
                .user_id(&bot)
                .device_id(&device),
        )
        .account(Account::token("nouser", &proxy2.url(), &token2));
    let rig = scenario.start().await;
    rig.wait_ready("nova", Duration::from_secs(30)).await;
    rig.wait_ready("nouser", Duration::from_secs(30)).await;
    let requests = proxy.requests();
    let first_sync = requests
        .iter()
        .position(|r| r.contains("/sync"))
        .expect("a sync went through the proxy");
    assert!(
        !requests[..first_sync].iter().any(|r| r.contains("whoami")),
        "{requests:#?}"
    );
    assert_eq!(proxy.count("/whoami"), 0, "{requests:#?}");
    assert_eq!(proxy.count("/login"), 0, "{requests:#?}");
    assert_eq!(proxy2.count("/whoami"), 1, "{:#?}", proxy2.requests());
    let saved: Value = serde_json::from_slice(
        &std::fs::read(session_file(scenario.state(), "nova")).expect("session.json"),
    )
    .expect("json");
    assert_eq!(saved["device_id"], device.as_str());
}

/// Scenario 6: `session.json` deleted with the store kept, then corrupted: each time the
/// account wipes its state, logs in fresh and comes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_or_corrupted_session_is_recovered_by_a_fresh_login() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let bot = hs.register("s6bot").await;
    let owner = hs.register("s6owner").await;
    // Through a proxy, so a restart can be held back until the operator listens.
    let proxy = FaultProxy::start(hs.addr()).await.expect("proxy");
    let scenario =
        scenario("s6").account(Account::password("nova", &proxy.url(), &bot).allow(&owner));
    let device = |path: &Path| -> String {
        let saved: Value =
            serde_json::from_slice(&std::fs::read(path).expect("session.json")).expect("json");
        saved["device_id"].as_str().expect("device_id").to_string()
    };
    let session = session_file(scenario.state(), "nova");

    let mut rig = scenario.start().await;
    rig.wait_ready("nova", Duration::from_secs(30)).await;
    let room = room_with(&owner, &bot, false).await;
    let first = device(&session);
    rig.warden.signal("-TERM");
    rig.warden.wait_exit(Duration::from_secs(20)).await;
    assert!(scenario.state().join("matrix/nova/store").is_dir());

    // 0. A plain restart restores the session (no login) and resumes sync from the stored
    //    token: a message sent while warden was down is forwarded after it.
    owner.send_text(&room, "while stopped").await;
    proxy.set_mode(Mode::Refuse).await;
    let mut rig = scenario.start().await;
    let mut op = rig.operator().await;
    proxy.set_mode(Mode::Forward).await;
    rig.wait_ready("nova", Duration::from_secs(30)).await;
    let restored = rig
        .warden
        .wait_for_log("Restored the Matrix session.", Duration::from_secs(5))
        .await;
    assert_eq!(restored["resumed"], true, "{restored}");
    assert!(!rig.warden.logs().contains("Logged in to Matrix."));
    let got = collect(&rig, &mut op, Duration::from_secs(20), |g| !g.is_empty()).await;
    assert_eq!(got[0]["body"], "while stopped");
    assert_eq!(device(&session), first, "the same device");
    rig.warden.signal("-TERM");
    rig.warden.wait_exit(Duration::from_secs(20)).await;

    // 1. session.json gone, store kept.
    std::fs::remove_file(&session).expect("remove session.json");
    let mut rig = scenario.start().await;
    let wiped = ready_after_a_wipe(&rig).await;
    assert!(
        wiped["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("without"),
        "{wiped}"
    );
    let second = device(&session);
    assert_ne!(first, second, "a fresh login makes a new device");
    rig.warden.signal("-TERM");
    rig.warden.wait_exit(Duration::from_secs(20)).await;

    // 2. session.json corrupted.
    std::fs::write(&session, b"{\"user_id\": 42").expect("corrupt session.json");
    let rig = scenario.start().await;
    let wiped = ready_after_a_wipe(&rig).await;
    assert!(
        wiped["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("unreadable"),
        "{wiped}"
    );
    let third = device(&session);
    assert_ne!(second, third);
    // And it works: the fresh session is still in the room, and a message is forwarded.
    let mut op = rig.operator().await;
    owner.send_text(&room, "after recovery").await;
    let got = collect(&rig, &mut op, Duration::from_secs(20), |g| !g.is_empty()).await;
    assert_eq!(got[0]["body"], "after recovery");
}

/// Scenario 7: 11 accounts start at once; all become ready and never more than 2 logins
/// are in flight (the `matrix_login` start-slot pool).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eleven_accounts_start_with_at_most_two_logins_in_flight() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let mut users = Vec::new();
    for _ in 0..11 {
        users.push(hs.register("s7bot").await);
    }
    let proxy = FaultProxy::start(hs.addr()).await.expect("proxy");
    let aliases: Vec<String> = (0..11).map(|i| format!("acct{i:02}")).collect();
    let accounts = users
        .iter()
        .zip(&aliases)
        .map(|(user, alias)| Account::password(alias, &proxy.url(), user));
    let scenario = scenario("s7").accounts(accounts);
    let started = Instant::now();
    let rig = scenario.start().await;
    for alias in &aliases {
        rig.wait_ready(alias, Duration::from_secs(60)).await;
    }
    let took = started.elapsed();
    let peak = proxy.peak_in_flight("/login");
    eprintln!(
        "scenario 7: 11 accounts ready in {:.2} s; peak logins in flight {peak}",
        took.as_secs_f64()
    );
    assert_eq!(proxy.count("/login"), 11, "{:#?}", proxy.requests());
    assert!(peak <= 2, "{peak} logins in flight at once");
    assert!(peak >= 1);
}

/// Scenario 8: `chat.send` round trips, into an encrypted room too; a message from a
/// sender not in `allowed_senders` is not forwarded; unknown accounts and rooms get named
/// errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_send_round_trips_in_plain_and_encrypted_rooms_and_filters_senders() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let bot = hs.register("s8bot").await;
    let owner = hs.register("s8owner").await;
    let mallory = hs.register("s8mal").await;
    let rig = scenario("s8")
        .account(Account::password("nova", hs.url(), &bot).allow(&owner))
        .start()
        .await;
    rig.wait_ready("nova", Duration::from_secs(30)).await;

    // Plain room: out and in, and a sender who is not allowed.
    let room = room_with(&owner, &bot, false).await;
    owner.invite(&room, &mallory.user_id).await;
    mallory.join(&room).await;
    let sent = rig
        .chat_send(json!({"account": "nova", "room_id": room, "body": "hello from warden"}))
        .await
        .expect("chat.send");
    let event_id = sent["event_id"].as_str().expect("event_id").to_string();
    let seen = owner
        .wait_for_message(&room, |m| m.event_id == event_id, Duration::from_secs(10))
        .await;
    assert_eq!(seen.sender, bot.user_id);
    assert_eq!(seen.body.as_deref(), Some("hello from warden"));

    let mut op = rig.operator().await;
    mallory.send_text(&room, "from mallory").await;
    let owner_event = owner.send_text(&room, "from owner").await;
    let got = collect(&rig, &mut op, Duration::from_secs(20), |g| !g.is_empty()).await;
    assert_eq!(
        got[0]["body"], "from owner",
        "mallory's came first: {got:?}"
    );
    assert_eq!(got[0]["sender"], owner.user_id.as_str());
    assert_eq!(got[0]["event_id"], owner_event.as_str());
    assert_eq!(got[0]["room_id"], room.as_str());
    assert_eq!(got[0]["account"], "nova");

    // A room's history from before the account joined is not forwarded.
    let old_room = owner.create_room(&[], false).await;
    owner.send_text(&old_room, "history before the join").await;
    owner.invite(&old_room, &bot.user_id).await;
    owner
        .wait_joined(&old_room, &bot.user_id, Duration::from_secs(30))
        .await;
    owner.send_text(&old_room, "after the join").await;
    let got = collect(&rig, &mut op, Duration::from_secs(20), |g| !g.is_empty()).await;
    assert_eq!(
        got[0]["body"], "after the join",
        "history was forwarded: {got:?}"
    );

    // Named errors.
    let err = rig
        .chat_send(json!({"account": "nobody", "room_id": room, "body": "x"}))
        .await
        .expect_err("unknown account");
    assert!(err.contains("unknown_account"), "{err}");
    let elsewhere = mallory.create_room(&[], false).await;
    let err = rig
        .chat_send(json!({"account": "nova", "room_id": elsewhere, "body": "x"}))
        .await
        .expect_err("not in that room");
    assert!(err.contains("forbidden"), "{err}");

    // Encrypted room, with a real E2EE client on the other side.
    let peer = EncryptedPeer::login(&owner).await;
    let secret_room = peer.create_encrypted_room(&[&bot.user_id]).await;
    peer.wait_joined(&secret_room, &bot.user_id, Duration::from_secs(30))
        .await;
    peer.send_text(&secret_room, "secret hello").await;
    let got = collect(&rig, &mut op, Duration::from_secs(30), |g| !g.is_empty()).await;
    assert_eq!(got[0]["body"], "secret hello", "warden decrypted it");
    assert_eq!(got[0]["room_id"], secret_room.as_str());

    let sent = rig
        .chat_send(json!({"account": "nova", "room_id": secret_room, "body": "secret reply"}))
        .await
        .expect("chat.send into the encrypted room");
    let reply_id = sent["event_id"].as_str().expect("event_id").to_string();
    let body = peer
        .wait_for_text(
            &secret_room,
            |sender, body| sender == bot.user_id && body == "secret reply",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(body, "secret reply");
    let raw = owner
        .wait_for_message(
            &secret_room,
            |m| m.event_id == reply_id,
            Duration::from_secs(10),
        )
        .await;
    assert!(
        raw.is_encrypted(),
        "it went over the wire encrypted: {raw:?}"
    );
}

/// `recovery_key`: after a fresh login the account imports its secrets with it; a wrong
/// key is a warning, not a failure (the account still syncs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_key_is_applied_after_a_fresh_login() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let bot = hs.register("rkbot").await;
    let other = hs.register("rkoth").await;
    // Another device of each account sets up recovery, as a user's own client would.
    let key = EncryptedPeer::login(&bot)
        .await
        .client
        .encryption()
        .recovery()
        .enable()
        .await
        .expect("enable recovery");
    let _other_key = EncryptedPeer::login(&other)
        .await
        .client
        .encryption()
        .recovery()
        .enable()
        .await
        .expect("enable recovery");
    let good = format!("recovery_key = \"{key}\"");
    let bad = "recovery_key = \"EsTc not the key at all\"".to_string();
    let rig = scenario("rk")
        .account(Account::password("good", hs.url(), &bot).line(&good))
        .account(Account::password("bad", hs.url(), &other).line(&bad))
        .start()
        .await;
    rig.wait_ready("good", Duration::from_secs(30)).await;
    rig.wait_ready("bad", Duration::from_secs(30)).await;
    let ok = rig
        .warden
        .wait_for_log(
            "Recovered the account's secrets with the recovery key.",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(
        ok["span"]["actor.path"], "root/channels/matrix/good/client",
        "{ok}"
    );
    let failed = rig
        .warden
        .wait_for_log(
            "Could not recover the account's secrets with the recovery key; encrypted history stays unreadable until it is fixed.",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(
        failed["span"]["actor.path"], "root/channels/matrix/bad/client",
        "{failed}"
    );
    assert_eq!(rig.client_node("bad").await["state"], "running");
}

/// Approvals decided in Matrix (issue 6), end to end: operator → broker → approval
/// handler → a direct message to the approver (a real E2EE client) → the approver's answer
/// → the node runs the command → the requester gets the result.
mod approvals {
    use super::*;

    /// A `warden node` named `name` with a `hello` command that needs an approval for each
    /// run, connected to `gateway`: every run below passed the broker's grant, which the
    /// node checked itself.
    fn node(name: &str, gateway: &str) -> Warden {
        let config = format!(
            "{}[node.commands.hello]\nargv = [\"echo\", \"hello from {name}\"]\n\
             approval = true\n",
            node_config(gateway, TOKEN, name)
        );
        Launch::node(name, &config).spawn()
    }

    /// A pending `approvals.request` of its own operator connection.
    fn request(
        rig: &Rig,
        node: &str,
        timeout_s: u64,
    ) -> tokio::task::JoinHandle<Result<Value, String>> {
        let gateway = rig.gateway.clone();
        let node = node.to_string();
        tokio::spawn(async move {
            let mut op = crate::support::operator(&gateway, TOKEN)
                .await
                .map_err(|e| e.to_string())?;
            let params = json!({"node": node, "command": "hello", "args": [],
                "reason": "integration test", "timeout_s": timeout_s});
            op.call("approvals.request", params)
                .await
                .map_err(|e| e.to_string())
        })
    }

    /// An operator subscribed to the approval events.
    async fn watcher(rig: &Rig) -> GatewayClient {
        rig.subscribed(&["approval.requested", "approval.resolved"])
            .await
    }

    /// The next event named `name`.
    async fn next(op: &mut GatewayClient, name: &str, within: Duration) -> Value {
        next_event(op, name, within)
            .await
            .unwrap_or_else(|| panic!("no {name} within {within:?}"))
    }

    /// The approver's DM with the bot: accepts the invite when there is one.
    async fn dm_with(peer: &EncryptedPeer, within: Duration) -> String {
        eventually(within, "a DM from the bot", async || {
            let joined = peer.client.joined_rooms();
            if let Some(room) = joined.iter().find(|r| r.direct_targets_length() > 0) {
                return Some(room.room_id().to_string());
            }
            let invite = peer.client.invited_rooms().into_iter().next()?;
            peer.join(invite.room_id().as_str()).await;
            Some(invite.room_id().to_string())
        })
        .await
    }

    /// Tests 1 and 2: approve by reply (with the timeline), approve by ✅ reaction, deny,
    /// timeout; a non-approver's answer is ignored and a second decision is not taken.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn approvals_are_decided_in_matrix_by_reply_reaction_deny_and_timeout() {
        let Some(hs) = synapse::require!() else {
            return;
        };
        let bot = hs.register("a1bot").await;
        let owner = hs.register("a1owner").await;
        let mallory = hs.register("a1mal").await;
        let peer = EncryptedPeer::login(&owner).await;
        let rig = scenario("a1")
            .account(Account::password("nova", hs.url(), &bot).approvals(&owner))
            .start()
            .await;
        rig.wait_ready("nova", Duration::from_secs(30)).await;
        rig.wait_handler("nova", Duration::from_secs(30)).await;
        let _node = node("a1node", &rig.gateway);
        rig.wait_node("a1node", Duration::from_secs(20)).await;
        let mut watch = watcher(&rig).await;

        // 1. Approve by reply, timed.
        let t0 = Instant::now();
        let pending = request(&rig, "a1node", 60);
        let requested = next(&mut watch, "approval.requested", Duration::from_secs(10)).await;
        let id = requested["id"].as_str().expect("id").to_string();
        let dm = dm_with(&peer, Duration::from_secs(30)).await;
        let text = peer
            .wait_for_text(&dm, |_, body| body.contains(&id), Duration::from_secs(30))
            .await;
        let t_dm = t0.elapsed();
        assert!(text.contains("approve") && text.contains("hello"), "{text}");
        peer.send_text(&dm, &format!("approve {id}")).await;
        let answer = pending.await.expect("task").expect("approvals.request");
        let t_done = t0.elapsed();
        assert_eq!(answer["decision"], "approved", "{answer}");
        assert_eq!(answer["by"], owner.user_id.as_str());
        let stdout = answer["result"].to_string();
        assert!(stdout.contains("hello from a1node"), "{answer}");
        eprintln!(
            "approval timeline: request → DM decrypted by the approver {:.0} ms → result at the requester {:.0} ms",
            t_dm.as_secs_f64() * 1000.0,
            t_done.as_secs_f64() * 1000.0
        );

        // 2. Approve by ✅ on the request message.
        let pending = request(&rig, "a1node", 60);
        let requested = next(&mut watch, "approval.requested", Duration::from_secs(10)).await;
        let id = requested["id"].as_str().expect("id").to_string();
        let message = peer
            .wait_for_message(&dm, |m| m.body.contains(&id), Duration::from_secs(30))
            .await;
        owner.send_reaction(&dm, &message.event_id, "✅").await;
        let answer = pending.await.expect("task").expect("approvals.request");
        assert_eq!(answer["decision"], "approved", "{answer}");
        assert_eq!(answer["by"], owner.user_id.as_str());

        // 3. A non-approver's answer is ignored; deny; a second decision is not taken.
        let room = owner
            .create_room(&[&bot.user_id, &mallory.user_id], false)
            .await;
        owner
            .wait_joined(&room, &bot.user_id, Duration::from_secs(30))
            .await;
        mallory.join(&room).await;
        let pending = request(&rig, "a1node", 60);
        let requested = next(&mut watch, "approval.requested", Duration::from_secs(10)).await;
        let id = requested["id"].as_str().expect("id").to_string();
        mallory.send_text(&room, &format!("approve {id}")).await;
        owner
            .send_text(&room, "a marker after mallory's answer")
            .await;
        let mut op = rig.operator().await;
        // The marker (an allowed sender's plain message) comes through: mallory's answer,
        // sent before it, has been seen and ignored by then.
        let got = collect(&rig, &mut op, Duration::from_secs(20), |g| !g.is_empty()).await;
        assert_eq!(got[0]["body"], "a marker after mallory's answer");
        let list = op.call("approvals.list", json!({})).await.expect("list");
        let entry = list["approvals"]
            .as_array()
            .and_then(|l| l.iter().find(|a| a["id"] == id.as_str()))
            .cloned()
            .expect("listed");
        assert_eq!(
            entry["resolved"], false,
            "mallory's answer was taken: {entry}"
        );
        peer.send_text(&dm, &format!("deny {id}")).await;
        let answer = pending.await.expect("task").expect("approvals.request");
        assert_eq!(answer["decision"], "denied", "{answer}");
        assert_eq!(answer["by"], owner.user_id.as_str());
        assert!(
            answer.get("result").is_none_or(Value::is_null),
            "a denied command ran: {answer}"
        );
        peer.send_text(&dm, &format!("approve {id}")).await;
        let late = rig
            .warden
            .wait_for_log("The decision was not taken.", Duration::from_secs(20))
            .await;
        assert!(
            late["error"]
                .as_str()
                .unwrap_or_default()
                .contains("already_resolved"),
            "{late}"
        );

        // 4. No decision in time → denied.
        let pending = request(&rig, "a1node", 2);
        let answer = pending.await.expect("task").expect("approvals.request");
        assert_eq!(answer["decision"], "denied", "{answer}");
        assert_eq!(answer["by"], "timeout");
    }

    /// Test 3: warden restarts while an approval is pending; the approver's answer after the
    /// restart still resolves it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pending_approval_is_resolved_after_a_restart() {
        let Some(hs) = synapse::require!() else {
            return;
        };
        let bot = hs.register("a3bot").await;
        let owner = hs.register("a3owner").await;
        let peer = EncryptedPeer::login(&owner).await;
        let scenario = scenario("a3")
            .gateway_bind(&format!("127.0.0.1:{}", free_port()))
            .account(Account::password("nova", hs.url(), &bot).approvals(&owner));
        let mut rig = scenario.start().await;
        rig.wait_ready("nova", Duration::from_secs(30)).await;
        rig.wait_handler("nova", Duration::from_secs(30)).await;
        let _node = node("a3node", &rig.gateway);
        rig.wait_node("a3node", Duration::from_secs(20)).await;
        let mut watch = watcher(&rig).await;
        let pending = request(&rig, "a3node", 300);
        let requested = next(&mut watch, "approval.requested", Duration::from_secs(10)).await;
        let id = requested["id"].as_str().expect("id").to_string();
        let dm = dm_with(&peer, Duration::from_secs(30)).await;
        peer.wait_for_text(&dm, |_, body| body.contains(&id), Duration::from_secs(30))
            .await;

        rig.warden.signal("-TERM");
        rig.warden.wait_exit(Duration::from_secs(20)).await;
        let lost = pending.await.expect("task");
        assert!(
            lost.is_err(),
            "the requester's call ended with the gateway: {lost:?}"
        );

        let rig = scenario.start().await;
        rig.wait_ready("nova", Duration::from_secs(30)).await;
        rig.wait_handler("nova", Duration::from_secs(30)).await;
        rig.wait_node("a3node", Duration::from_secs(20)).await;
        let mut watch = watcher(&rig).await;
        peer.send_text(&dm, &format!("approve {id}")).await;
        let resolved = next(&mut watch, "approval.resolved", Duration::from_secs(30)).await;
        assert_eq!(resolved["id"], id.as_str());
        assert_eq!(resolved["decision"], "approved", "{resolved}");
        assert_eq!(resolved["by"], owner.user_id.as_str());
        assert!(
            resolved["result"].to_string().contains("hello from a3node"),
            "{resolved}"
        );
    }

    /// A pending `approvals.request` with `params`, on its own operator connection.
    fn request_with(rig: &Rig, params: Value) -> tokio::task::JoinHandle<Result<Value, String>> {
        let gateway = rig.gateway.clone();
        tokio::spawn(async move {
            let mut op = crate::support::operator(&gateway, TOKEN)
                .await
                .map_err(|e| e.to_string())?;
            op.call("approvals.request", params)
                .await
                .map_err(|e| e.to_string())
        })
    }

    /// Waits until approval `id`'s current notice through `account` is delivered; returns
    /// its room and event.
    async fn delivered(op: &mut GatewayClient, id: &str, account: &str) -> (String, String) {
        let what = format!("approval {id} delivered through {account}");
        eventually(Duration::from_secs(30), what, async || {
            let list = op.call("approvals.list", json!({})).await.ok()?;
            let entry = list["approvals"]
                .as_array()?
                .iter()
                .find(|a| a["id"] == id)?
                .clone();
            let notice = entry["notices"]
                .as_array()?
                .iter()
                .find(|n| n["account"] == account && n["active"] == true)?
                .clone();
            Some((
                notice["room_id"].as_str()?.to_string(),
                notice["event_id"].as_str()?.to_string(),
            ))
        })
        .await
    }

    /// What the owner got from each of `bots` in rooms: (rooms with a message of the bot,
    /// messages of the bot), read through the raw API, so an encrypted message counts as
    /// one event. Every pending invite is accepted first.
    async fn dm_counts(owner: &User, peer: &EncryptedPeer, bots: &[User]) -> Vec<(usize, usize)> {
        for invite in peer.client.invited_rooms() {
            peer.join(invite.room_id().as_str()).await;
        }
        let mut counts = vec![(0, 0); bots.len()];
        for room in peer.client.joined_rooms() {
            let messages = owner.messages(room.room_id().as_str(), 200).await;
            for (count, bot) in counts.iter_mut().zip(bots) {
                let sent = messages
                    .iter()
                    .filter(|m| m.sender == bot.user_id)
                    .filter(|m| m.kind == "m.room.message" || m.is_encrypted())
                    .count();
                if sent > 0 {
                    count.0 += 1;
                    count.1 += sent;
                }
            }
        }
        counts
    }

    /// Waits until [`dm_counts`] is `expected`.
    async fn wait_counts(
        owner: &User,
        peer: &EncryptedPeer,
        bots: &[User],
        expected: &[(usize, usize)],
    ) {
        let mut last = Vec::new();
        let what = format!("the owner's DMs per bot (rooms, messages) to be {expected:?}");
        let reached = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                last = dm_counts(owner, peer, bots).await;
                if last == expected {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        assert!(reached.is_ok(), "{what}; last seen {last:?}");
    }

    /// Issue 14: three accounts list one approver. One request is one DM, through the
    /// first ready account; that account's client killed twice while pending sends nothing
    /// again; a decision elsewhere (another room, a reaction on another event) counts for
    /// nothing; its account parked, the approval goes to the next account once, after
    /// `renotify_after_ms`; a request naming an account goes through that account, and a
    /// bare reply to its message decides. Each record says where it was decided.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_dm_per_approval_across_accounts_and_decisions_only_where_asked() {
        let Some(hs) = synapse::require!() else {
            return;
        };
        let bots = [
            hs.register("m1alpha").await,
            hs.register("m1beta").await,
            hs.register("m1gamma").await,
        ];
        let owner = hs.register("m1owner").await;
        let peer = EncryptedPeer::login(&owner).await;
        let aliases = ["alpha", "beta", "gamma"];
        let accounts = aliases
            .iter()
            .zip(&bots)
            .map(|(alias, bot)| Account::password(alias, hs.url(), bot).approvals(&owner));
        let rig = scenario("m1")
            // Killed clients come back well within renotify_after_ms (their built-in first
            // backoff is 1 s and grows): a kill is no outage worth a hand-over here.
            .config(
                "[approvals]\nrenotify_after_ms = 3000\n[supervision.kinds]\n\
                 matrix_account = { backoff = { initial_ms = 100, max_ms = 300 } }",
            )
            .accounts(accounts)
            .start()
            .await;
        for alias in aliases {
            rig.wait_ready(alias, Duration::from_secs(30)).await;
            rig.wait_handler(alias, Duration::from_secs(30)).await;
        }
        let _node = node("m1node", &rig.gateway);
        rig.wait_node("m1node", Duration::from_secs(20)).await;
        let mut watch = rig
            .subscribed(&["approval.requested", "approval.notify", "approval.resolved"])
            .await;
        let mut op = rig.operator().await;
        let owner_id = owner.user_id.as_str();
        let params = |account: Option<&str>| {
            json!({"node": "m1node", "command": "hello", "args": [], "reason": "issue 14",
                "timeout_s": 300, "account": account})
        };

        // 1. One request: one DM, through alpha (the first ready account by alias).
        let pending = request_with(&rig, params(None));
        let requested = next(&mut watch, "approval.requested", Duration::from_secs(10)).await;
        let id1 = requested["id"].as_str().expect("id").to_string();
        assert_eq!(
            requested["notify"],
            json!([{"approver": owner_id, "account": "alpha"}]),
            "{requested}"
        );
        let (alpha_dm, _) = delivered(&mut op, &id1, "alpha").await;
        wait_counts(&owner, &peer, &bots, &[(1, 1), (0, 0), (0, 0)]).await;
        eprintln!("approver DMs after one request to 3 accounts listing them: 1 room, 1 message");

        // 2. Alpha's client killed twice while it is pending: its handler restarts with it
        // and sends nothing again.
        for _ in 0..2 {
            rig.restart_client("alpha", Duration::from_secs(30)).await;
            rig.wait_handler("alpha", Duration::from_secs(30)).await;
        }
        // Each incarnation of alpha's handler found nothing left to send.
        let connected: Vec<Value> = rig
            .warden
            .logs_of("Approval handler connected.")
            .into_iter()
            .filter(|v| v["account"] == "alpha")
            .collect();
        assert_eq!(connected.len(), 3, "{connected:?}");
        assert!(
            connected.iter().all(|v| v["pending"] == 0),
            "a restarted handler had a delivered notification to send again: {connected:?}"
        );

        // 3. The owner's answer in another room, and a ✅ on another event of the DM, decide
        // nothing; the deny in the DM does, and the record says where.
        let group = owner.create_room(&[&bots[0].user_id], false).await;
        owner
            .wait_joined(&group, &bots[0].user_id, Duration::from_secs(30))
            .await;
        owner.send_text(&group, &format!("approve {id1}")).await;
        let note = peer.send_text(&alpha_dm, "just a note").await;
        owner.send_reaction(&alpha_dm, &note, "✅").await;
        peer.send_text(&alpha_dm, "marker").await;
        let mut chat = rig.subscribed(&["chat.message"]).await;
        collect(&rig, &mut chat, Duration::from_secs(30), |got| {
            got.iter().any(|m| m["body"] == "marker")
        })
        .await;
        let deny = peer.send_text(&alpha_dm, &format!("deny {id1}")).await;
        let answer = pending.await.expect("task").expect("approvals.request");
        assert_eq!(
            answer["decision"], "denied",
            "an answer elsewhere was taken: {answer}"
        );
        assert_eq!(
            answer["via"],
            json!({"account": "alpha", "room_id": alpha_dm, "event_id": deny}),
            "{answer}"
        );
        assert_eq!(
            dm_counts(&owner, &peer, &bots).await,
            [(1, 1), (0, 0), (0, 0)],
            "a restarted handler sent its DM again"
        );

        // 4. A second request goes to alpha; alpha is parked (its user deactivated, its
        // client restarted): after renotify_after_ms the owner is told once more, through
        // beta, and a ✅ on beta's message decides.
        let pending = request_with(&rig, params(None));
        let requested = next(&mut watch, "approval.requested", Duration::from_secs(10)).await;
        let id2 = requested["id"].as_str().expect("id").to_string();
        assert_eq!(requested["notify"][0]["account"], "alpha", "{requested}");
        delivered(&mut op, &id2, "alpha").await;
        wait_counts(&owner, &peer, &bots, &[(1, 2), (0, 0), (0, 0)]).await;
        bots[0].deactivate().await;
        let down = Instant::now();
        rig.kill_client("alpha").await;
        let Some(handed) = next_event(&mut watch, "approval.notify", Duration::from_secs(30)).await
        else {
            panic!(
                "not handed on; alpha's client: {}\nwarden's logs:\n{}",
                rig.client_node("alpha").await,
                rig.warden.logs()
            );
        };
        let after = down.elapsed();
        assert_eq!(handed["id"], id2.as_str());
        assert_eq!(
            handed["notify"],
            json!([{"approver": owner_id, "account": "beta"}]),
            "{handed}"
        );
        assert!(after >= Duration::from_secs(3), "handed on after {after:?}");
        rig.wait_client("alpha", Duration::from_secs(60), |n| n["state"] == "parked")
            .await;
        let (beta_dm, beta_request) = delivered(&mut op, &id2, "beta").await;
        wait_counts(&owner, &peer, &bots, &[(1, 2), (1, 1), (0, 0)]).await;
        eprintln!(
            "re-notified through beta {} ms after alpha went down",
            after.as_millis()
        );
        owner.send_reaction(&beta_dm, &beta_request, "✅").await;
        let answer = pending.await.expect("task").expect("approvals.request");
        assert_eq!(answer["decision"], "approved", "{answer}");
        assert_eq!(answer["via"]["account"], "beta", "{answer}");
        assert_eq!(answer["via"]["room_id"], beta_dm.as_str(), "{answer}");

        // 5. A request naming gamma goes through gamma alone; a reply without the id to its
        // message approves.
        let pending = request_with(&rig, params(Some("gamma")));
        let requested = next(&mut watch, "approval.requested", Duration::from_secs(10)).await;
        let id3 = requested["id"].as_str().expect("id").to_string();
        assert_eq!(
            requested["notify"],
            json!([{"approver": owner_id, "account": "gamma"}]),
            "{requested}"
        );
        let (gamma_dm, gamma_request) = delivered(&mut op, &id3, "gamma").await;
        wait_counts(&owner, &peer, &bots, &[(1, 2), (1, 1), (1, 1)]).await;
        let reply = peer.send_reply(&gamma_dm, &gamma_request, "approve").await;
        let answer = pending.await.expect("task").expect("approvals.request");
        assert_eq!(answer["decision"], "approved", "{answer}");
        assert_eq!(
            answer["via"],
            json!({"account": "gamma", "room_id": gamma_dm, "event_id": reply}),
            "{answer}"
        );
        let counts = dm_counts(&owner, &peer, &bots).await;
        assert_eq!(
            counts,
            [(1, 2), (1, 1), (1, 1)],
            "DMs per bot (rooms, messages)"
        );
        eprintln!(
            "approver DMs for 3 requests (one re-notified after its account parked, two client \
             kills): {} rooms, {} messages",
            counts.iter().map(|c| c.0).sum::<usize>(),
            counts.iter().map(|c| c.1).sum::<usize>()
        );
    }

    /// Test 4: approvers without `enabled` start no handler.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn approvers_without_enabled_start_no_handler() {
        let Some(hs) = synapse::require!() else {
            return;
        };
        let bot = hs.register("a4bot").await;
        let owner = hs.register("a4owner").await;
        let extra = format!("approvals = {{ approvers = [\"{}\"] }}", owner.user_id);
        let rig = scenario("a4")
            .account(Account::password("nova", hs.url(), &bot).line(&extra))
            .start()
            .await;
        rig.wait_ready("nova", Duration::from_secs(30)).await;
        let account = rig.tree_node("root/channels/matrix/nova").await;
        assert!(account.is_object(), "no account subtree");
        let children: Vec<&str> = account["children"]
            .as_array()
            .map(|c| c.iter().filter_map(|c| c["id"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(children, ["client"], "{account:#}");
        let mut op = rig.operator().await;
        let status = op.call("status", json!({})).await.expect("status");
        assert_eq!(status["sessions"]["approver"], 0, "{status}");
    }

    /// Test 5: 30 accounts with approvals start at once against a gateway with a 2 s
    /// handshake timeout and 8 pre-auth sockets per address: every handler connects, no
    /// handshake times out, nothing gets a 503, and the pool never has more than 3 holders.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn thirty_handlers_connect_through_the_start_slots_without_a_storm() {
        let Some(hs) = synapse::require!() else {
            return;
        };
        let owner = hs.register("a5owner").await;
        let mut users = Vec::new();
        for _ in 0..30 {
            users.push(hs.register("a5bot").await);
        }
        let aliases: Vec<String> = (0..30).map(|i| format!("acct{i:02}")).collect();
        let accounts = users
            .iter()
            .zip(&aliases)
            .map(|(user, alias)| Account::password(alias, hs.url(), user).approvals(&owner));
        let scenario = scenario("a5")
            .config("[gateway]\nhandshake_timeout_ms = 2000\nmax_preauth_per_ip = 8\n")
            .accounts(accounts);
        let started = Instant::now();
        let rig = scenario.start().await;
        let mut handlers = Vec::new();
        for alias in &aliases {
            handlers.push(rig.wait_handler(alias, Duration::from_secs(60)).await);
        }
        let took = started.elapsed();
        // A handshake that timed out or met a 503 would have failed its handler: every
        // handler is on its first incarnation.
        for handler in &handlers {
            assert_eq!(handler["generation"], 1, "{handler:#}");
            assert_eq!(handler["restarts_total"], 0, "{handler:#}");
        }
        let metrics = rig.metrics().await;
        let value = |name: &str, label: &str| -> f64 {
            metrics
                .lines()
                .filter(|l| l.starts_with(name) && l.contains(label))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        let peak = value("warden_start_slot_holders_peak", "pool=\"approvals\"");
        let timeouts = value("warden_gateway_handshake_timeouts_total", "");
        let refused = value("warden_gateway_preauth_rejections_total", "");
        let restarts = value("warden_restarts_total", "kind=\"approval_handler\"");
        eprintln!(
            "test 5: 30 handlers connected in {:.2} s; peak slot holders {peak}, handshake timeouts {timeouts}, 503s {refused}, handler restarts {restarts}",
            took.as_secs_f64()
        );
        assert!(
            (1.0..=3.0).contains(&peak),
            "peak holders {peak}\n{metrics}"
        );
        assert_eq!(timeouts, 0.0, "{metrics}");
        assert_eq!(refused, 0.0, "{metrics}");
        assert_eq!(restarts, 0.0, "{metrics}");
        let mut op = rig.operator().await;
        let status = op.call("status", json!({})).await.expect("status");
        assert_eq!(status["sessions"]["approver"], 30, "{status}");
    }
}
