//! The inbox: no message a person writes is lost while warden or an agent is away.
//!
//! Against a real Synapse and real `warden run` processes (killed with SIGKILL, stopped,
//! restarted on the same state), with the fault proxy between warden and the homeserver;
//! the seam between replay and live runs on an in-process gateway with a real inbox file
//! and real sockets, where the timing can be varied many times in one test.

use std::collections::HashSet;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::time::Instant;
use warden_actors::gateway::client::{CallError, ConnectOptions, GatewayClient, Incoming};
use warden_actors::gateway::protocol::{ClientInfo, Role};
use warden_actors::gateway::{GatewaySettings, GatewayState};
use warden_actors::inbox::{Inbox, InboxSettings, NewMessage};

use crate::fault_proxy::{FaultProxy, Mode};
use crate::support::{Account, Launch, Rig, Scenario, TempDir, free_port, gateway_tree, operator};
use crate::synapse::{self, Synapse, User};

const TOKEN: &str = "inbox-test-token";

fn scenario(name: &str) -> Scenario {
    Scenario::new(&format!("inbox-{name}"), TOKEN)
}

/// A room of `owner` that `bot` joined by accepting the invite itself.
async fn room_with(owner: &User, bot: &User) -> String {
    let room = owner.create_room(&[&bot.user_id], false).await;
    owner
        .wait_joined(&room, &bot.user_id, Duration::from_secs(30))
        .await;
    room
}

/// One account `nova` of user `<prefix>bot`, forwarding the messages of
/// `<prefix>owner`, at `homeserver` (Synapse or a proxy in front of it), in a scenario
/// `more` adds to; started and ready, with a room of the owner the account joined.
async fn one_account(
    hs: &Synapse,
    prefix: &str,
    homeserver: Option<&str>,
    more: impl FnOnce(Scenario) -> Scenario,
) -> (Scenario, Rig, User, String) {
    let bot = hs.register(&format!("{prefix}bot")).await;
    let owner = hs.register(&format!("{prefix}owner")).await;
    let homeserver = homeserver.unwrap_or(hs.url());
    let account = Account::password("nova", homeserver, &bot).allow(&owner);
    let scenario = more(scenario(prefix)).account(account);
    let rig = scenario.start().await;
    rig.wait_ready("nova", Duration::from_secs(30)).await;
    let room = room_with(&owner, &bot).await;
    (scenario, rig, owner, room)
}

/// What a reader received: `chat.message` and `chat.gap` events, in order.
#[derive(Debug, Clone)]
enum Got {
    Message(Value),
    Gap(Value),
}

/// Reads `chat.message` / `chat.gap` events until `done`, or panics at the deadline.
async fn read_until(
    op: &mut GatewayClient,
    within: Duration,
    what: &str,
    done: impl Fn(&[Got]) -> bool,
) -> Vec<Got> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while !done(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, op.next_event()).await {
            Ok(Ok(Incoming::Event { event, payload })) if event == "chat.message" => {
                got.push(Got::Message(payload))
            }
            Ok(Ok(Incoming::Event { event, payload })) if event == "chat.gap" => {
                got.push(Got::Gap(payload))
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!(
                "{what}: the connection failed after {} events: {e}",
                got.len()
            ),
            Err(_) => panic!(
                "{what}: {} events within {within:?}, the last: {:?}",
                got.len(),
                got.last()
            ),
        }
    }
    got
}

fn messages(got: &[Got]) -> Vec<&Value> {
    got.iter()
        .filter_map(|g| match g {
            Got::Message(m) => Some(m),
            Got::Gap(_) => None,
        })
        .collect()
}

fn count_messages(got: &[Got]) -> usize {
    messages(got).len()
}

fn bodies(got: &[Got]) -> Vec<String> {
    messages(got)
        .iter()
        .map(|m| m["body"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Nothing more within `within` (a late duplicate would come now).
async fn nothing_more(op: &mut GatewayClient, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, op.next_event()).await {
            Ok(Ok(Incoming::Event { event, payload }))
                if event == "chat.message" || event == "chat.gap" =>
            {
                panic!("an extra {event}: {payload}")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("the connection failed: {e}"),
            Err(_) => return,
        }
    }
}

/// Sends `body` to `room` as `owner` and waits until the account stored it (and so has
/// synced the room).
async fn send_and_wait_stored(rig: &Rig, owner: &User, room: &str, body: &str) {
    owner.send_text(room, body).await;
    let (mut op, _) = reader(rig, json!({ "since": "earliest" })).await;
    read_until(&mut op, Duration::from_secs(30), body, |g| {
        bodies(g).iter().any(|b| b == body)
    })
    .await;
    op.close().await;
}

/// An operator of `rig` that subscribed with `params` (`events` added).
async fn reader(rig: &Rig, mut params: Value) -> (GatewayClient, Value) {
    let mut op = rig.connect().await.expect("operator connects");
    params["events"] = json!(["chat.message"]);
    let answer = op.call("subscribe", params).await.expect("subscribe");
    (op, answer)
}

/// Restarts warden (SIGTERM, exit 0, start again on the same state) and waits for `alias`.
async fn restart(scenario: &Scenario, rig: Rig, alias: &str) -> Rig {
    stop(rig).await;
    let rig = scenario.start().await;
    rig.wait_ready(alias, Duration::from_secs(30)).await;
    rig
}

/// The inbox file of `scenario`, opened to stage what a crash at the wrong moment leaves.
fn inbox_file(scenario: &Scenario) -> rusqlite::Connection {
    rusqlite::Connection::open(scenario.state().join("inbox.sqlite3")).expect("the inbox file")
}

/// Stops warden with SIGTERM (exit 0).
async fn stop(rig: Rig) {
    let mut rig = rig;
    rig.warden.signal("-TERM");
    assert_eq!(rig.warden.exit_code(Duration::from_secs(15)).await, 0);
}

/// Test 1: no agent connected; a person sends 200 messages to two rooms while warden is
/// killed with SIGKILL three times at random moments and the proxy resets warden's
/// connections; a reader with `since: "earliest"` then gets all 200 exactly once, in order
/// per room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_messages_survive_three_sigkills_and_resets_exactly_once_in_order() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let bot = hs.register("ibkill").await;
    let owner = hs.register("ibkillowner").await;
    let proxy = FaultProxy::start(hs.addr()).await.expect("proxy");
    let scenario =
        scenario("kill").account(Account::password("nova", &proxy.url(), &bot).allow(&owner));
    let mut rig = scenario.start().await;
    rig.wait_ready("nova", Duration::from_secs(30)).await;
    let rooms = [room_with(&owner, &bot).await, room_with(&owner, &bot).await];

    let seed: u64 = rand::random();
    eprintln!("inbox kill test: seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let sender = tokio::spawn({
        let (owner, rooms) = (owner.clone(), rooms.clone());
        let pauses: Vec<u64> = (0..200).map(|_| rng.random_range(5..45)).collect();
        async move {
            for (i, pause) in pauses.into_iter().enumerate() {
                owner
                    .send_text(&rooms[i % 2], &format!("r{} {i:03}", i % 2))
                    .await;
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
    });
    let started = Instant::now();
    for kill in 0..3 {
        // A random moment while the person writes.
        let wait = Duration::from_millis(rng.random_range(200..1800));
        tokio::time::sleep(wait).await;
        let reset = proxy.reset_all().await;
        rig.warden.signal("-KILL");
        rig.warden.wait_exit(Duration::from_secs(10)).await;
        eprintln!(
            "inbox kill test: kill {} at {} ms ({reset} connections reset)",
            kill + 1,
            started.elapsed().as_millis()
        );
        drop(rig);
        rig = scenario.start().await;
        rig.wait_ready("nova", Duration::from_secs(30)).await;
    }
    sender.await.expect("sender");
    eprintln!(
        "inbox kill test: sent 200 in {} ms",
        started.elapsed().as_millis()
    );

    let (mut op, answer) = reader(&rig, json!({ "since": "earliest" })).await;
    assert_eq!(answer["from"], 0, "{answer}");
    let got = read_until(&mut op, Duration::from_secs(90), "all 200", |g| {
        count_messages(g) >= 200
    })
    .await;
    nothing_more(&mut op, Duration::from_secs(3)).await;
    let got = bodies(&got);
    let unique: HashSet<&String> = got.iter().collect();
    assert_eq!(unique.len(), 200, "each once: {got:?}");
    for room in 0..2 {
        let in_room: Vec<&String> = got
            .iter()
            .filter(|b| b.starts_with(&format!("r{room} ")))
            .collect();
        let expected: Vec<String> = (0..200)
            .filter(|i| i % 2 == room)
            .map(|i| format!("r{room} {i:03}"))
            .collect();
        assert_eq!(
            in_room,
            expected.iter().collect::<Vec<_>>(),
            "room {room} in order"
        );
    }
}

/// Test 2: a durable consumer acknowledges half, disconnects; warden restarts; the
/// consumer subscribes again by name and gets exactly the other half, then live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_consumer_resumes_after_its_last_ack_across_a_restart() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let (scenario, rig, owner, room) = one_account(hs, "ibcons", None, |s| s).await;
    for i in 0..20 {
        owner.send_text(&room, &format!("c {i:02}")).await;
    }
    let (mut op, answer) = reader(&rig, json!({ "consumer": "agent" })).await;
    assert_eq!(
        answer["from"], 0,
        "a new consumer starts at the oldest kept: {answer}"
    );
    let got = read_until(&mut op, Duration::from_secs(30), "first 20", |g| {
        count_messages(g) >= 20
    })
    .await;
    let expected: Vec<String> = (0..20).map(|i| format!("c {i:02}")).collect();
    assert_eq!(bodies(&got), expected);
    let tenth = messages(&got)[9]["cursor"].as_u64().expect("cursor");
    let acked = op
        .call("chat.ack", json!({ "consumer": "agent", "cursor": tenth }))
        .await
        .expect("ack");
    assert_eq!(acked, json!({ "consumer": "agent", "cursor": tenth }));
    op.close().await;

    let rig = restart(&scenario, rig, "nova").await;
    let (mut op, answer) = reader(&rig, json!({ "consumer": "agent" })).await;
    assert_eq!(answer["from"], tenth, "{answer}");
    let got = read_until(&mut op, Duration::from_secs(30), "the other half", |g| {
        count_messages(g) >= 10
    })
    .await;
    assert_eq!(bodies(&got), expected[10..].to_vec());
    // Then live, with nothing repeated in between.
    owner.send_text(&room, "c live").await;
    let live = read_until(&mut op, Duration::from_secs(30), "live", |g| {
        count_messages(g) >= 1
    })
    .await;
    assert_eq!(bodies(&live), ["c live"]);
    let stats = op.call("inbox.stats", json!({})).await.expect("stats");
    assert_eq!(stats["consumers"]["agent"]["cursor"], tenth, "{stats}");
    assert_eq!(stats["consumers"]["agent"]["lag"], 11, "{stats}");
    assert_eq!(stats["accounts"]["nova"]["messages"], 21, "{stats}");
    // The tree shows the account's inbox.
    let node = rig.tree_node("root/channels/matrix/nova").await;
    assert_eq!(node["inbox"]["messages"], 21, "{node:#}");
    let metrics = rig.metrics().await;
    assert!(
        metrics.contains("warden_inbox_consumer_lag{consumer=\"agent\"}"),
        "{metrics}"
    );
}

/// Test 4: warden stopped, 800 messages sent to one room (more than one sync returns),
/// warden started: all 800 are delivered, in order — the resumed sync's limited timeline
/// is back-paginated to the stored position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_hundred_messages_sent_while_warden_was_stopped_are_all_delivered_in_order() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let (scenario, rig, owner, room) = one_account(hs, "ibdown", None, |s| s).await;
    send_and_wait_stored(&rig, &owner, &room, "before").await;
    stop(rig).await;

    let sent = Instant::now();
    for i in 0..800 {
        owner.send_text(&room, &format!("d {i:03}")).await;
    }
    eprintln!(
        "inbox downtime test: 800 sent in {} ms",
        sent.elapsed().as_millis()
    );
    let rig = scenario.start().await;
    rig.wait_ready("nova", Duration::from_secs(60)).await;
    let fetched = rig
        .warden
        .wait_for_log(
            "Fetched what arrived in a room beyond one sync's limit.",
            Duration::from_secs(10),
        )
        .await;
    assert!(fetched["events"].as_u64() >= Some(300), "{fetched}");
    let (mut op, _) = reader(&rig, json!({ "since": "earliest" })).await;
    let got = read_until(&mut op, Duration::from_secs(60), "801", |g| {
        count_messages(g) >= 801
    })
    .await;
    nothing_more(&mut op, Duration::from_secs(2)).await;
    let expected: Vec<String> = std::iter::once("before".to_string())
        .chain((0..800).map(|i| format!("d {i:03}")))
        .collect();
    assert_eq!(bodies(&got), expected);
    let cursors: Vec<u64> = messages(&got)
        .iter()
        .map(|m| m["cursor"].as_u64().expect("cursor"))
        .collect();
    assert!(cursors.windows(2).all(|w| w[0] < w[1]), "rising cursors");
}

/// The commit-order invariant's hard case: the Matrix store saved a sync's position but
/// the inbox did not store its messages (a crash between the two writes, staged here by
/// rewinding the inbox). The SDK would drop that sync's response if it came again; warden
/// reads the gap back with `/messages` and stores what was missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_cut_off_between_the_matrix_store_and_the_inbox_is_read_back() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let (scenario, rig, owner, room) = one_account(hs, "ibcut", None, |s| s).await;
    send_and_wait_stored(&rig, &owner, &room, "kept").await;
    stop(rig).await;
    let position: String = inbox_file(&scenario)
        .query_row(
            "SELECT token FROM positions WHERE account = 'nova'",
            [],
            |r| r.get(0),
        )
        .expect("a position");

    let rig = scenario.start().await;
    rig.wait_ready("nova", Duration::from_secs(30)).await;
    owner.send_text(&room, "cut off").await;
    let (mut op, _) = reader(&rig, json!({ "since": "earliest" })).await;
    read_until(&mut op, Duration::from_secs(30), "cut off", |g| {
        count_messages(g) >= 2
    })
    .await;
    op.close().await;
    stop(rig).await;
    // What a crash after the SDK saved its position, before the inbox commit, leaves.
    let db = inbox_file(&scenario);
    let removed = db
        .execute("DELETE FROM messages WHERE body = 'cut off'", [])
        .expect("unstore");
    assert_eq!(removed, 1);
    db.execute(
        "UPDATE positions SET token = ?1 WHERE account = 'nova'",
        [&position],
    )
    .expect("rewind");
    drop(db);

    let rig = scenario.start().await;
    rig.wait_ready("nova", Duration::from_secs(30)).await;
    rig.warden
        .wait_for_log(
            "The Matrix store is ahead of the inbox (a sync was cut off before its messages were stored); reading them back.",
            Duration::from_secs(5),
        )
        .await;
    let (mut op, _) = reader(&rig, json!({ "since": "earliest" })).await;
    let got = read_until(&mut op, Duration::from_secs(30), "both", |g| {
        count_messages(g) >= 2
    })
    .await;
    nothing_more(&mut op, Duration::from_secs(2)).await;
    assert_eq!(bodies(&got), ["kept", "cut off"]);
}

/// A stored position the homeserver refuses (the alias moved to another server, its
/// database was reset) does not fail every restart. With the Matrix store's own position
/// the catch-up skips the refused read-back with a WARN; with a store that never synced
/// (wiped here) the full-state sync from the refused position drops it with a WARN. Either
/// way the account comes back and goes on storing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_the_homeserver_refuses_is_dropped_not_retried_forever() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let (scenario, rig, owner, room) = one_account(hs, "ibbad", None, |s| s).await;
    // The account has synced the room once a message of it is stored.
    send_and_wait_stored(&rig, &owner, &room, "before").await;
    let spoil = || {
        let changed = inbox_file(&scenario)
            .execute(
                "UPDATE positions SET token = 'not-a-sync-token' WHERE account = 'nova'",
                [],
            )
            .expect("spoil the position");
        assert_eq!(changed, 1);
    };
    let cases = [
        (
            "the store's position",
            "The homeserver refused to read back a room; what it received in the cut-off sync was not stored.",
        ),
        (
            "a wiped store",
            "The homeserver refused the inbox's sync position; dropping it. What arrived since it may not be stored.",
        ),
    ];
    let mut rig = rig;
    for (i, (case, warning)) in cases.into_iter().enumerate() {
        stop(rig).await;
        spoil();
        if i == 1 {
            let store = scenario.state().join("matrix").join("nova");
            std::fs::remove_dir_all(&store).expect("wipe the Matrix store");
        }
        rig = scenario.start().await;
        rig.warden
            .wait_for_log(warning, Duration::from_secs(15))
            .await;
        rig.wait_ready("nova", Duration::from_secs(30)).await;
        let body = format!("after {case}");
        owner.send_text(&room, &body).await;
        let (mut op, _) = reader(&rig, json!({ "since": "earliest" })).await;
        let got = read_until(&mut op, Duration::from_secs(30), case, |g| {
            bodies(g).contains(&body)
        })
        .await;
        assert_eq!(
            bodies(&got).iter().filter(|b| **b == body).count(),
            1,
            "{case}"
        );
    }
}

/// Messages sent to a room while warden was stopped, after which the account was kicked
/// from it, are still stored: the resumed sync lists the room as left, with its timeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_before_a_kick_during_downtime_are_stored() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let (scenario, rig, owner, room) = one_account(hs, "ibkick", None, |s| s).await;
    let bot_id = room_member_other_than(&owner, &room).await;
    // The account has synced the room once a message of it is stored.
    send_and_wait_stored(&rig, &owner, &room, "joined").await;
    stop(rig).await;
    for i in 0..3 {
        owner.send_text(&room, &format!("k {i}")).await;
    }
    let (status, reply) = owner
        .api(
            reqwest::Method::POST,
            &["rooms", &room, "kick"],
            &[],
            Some(json!({ "user_id": bot_id })),
            None,
        )
        .await
        .expect("kick");
    assert_eq!(status, 200, "{reply}");
    let rig = scenario.start().await;
    rig.wait_ready("nova", Duration::from_secs(30)).await;
    let (mut op, _) = reader(&rig, json!({ "since": "earliest" })).await;
    let got = read_until(&mut op, Duration::from_secs(30), "4", |g| {
        count_messages(g) >= 4
    })
    .await;
    assert_eq!(bodies(&got), ["joined", "k 0", "k 1", "k 2"]);
}

/// The one member of `room` besides `owner`.
async fn room_member_other_than(owner: &User, room: &str) -> String {
    let members = owner.joined_members(room).await;
    let others: Vec<&String> = members.iter().filter(|m| **m != owner.user_id).collect();
    assert_eq!(others.len(), 1, "{members:?}");
    others[0].clone()
}

/// Test 5: with a tiny retention, a consumer that fell behind what was trimmed gets
/// `chat.gap` with the trimmed range before its next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_behind_the_retention_gets_a_gap_before_its_next_message() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let tiny = |s: Scenario| s.config("[inbox]\nmax_messages_per_account = 5");
    let (_scenario, rig, owner, room) = one_account(hs, "ibgap", None, tiny).await;
    // The consumer exists (at 0) before any message.
    let mut op = rig.connect().await.expect("operator");
    op.call("chat.ack", json!({ "consumer": "slow", "cursor": 0 }))
        .await
        .expect("a consumer at 0");
    for i in 0..12 {
        owner.send_text(&room, &format!("g {i:02}")).await;
    }
    crate::support::eventually(Duration::from_secs(30), "12 stored", async || {
        let stats = op.call("inbox.stats", json!({})).await.expect("stats");
        stats["head"].as_u64() >= Some(12)
    })
    .await;
    op.close().await;
    let (mut op, answer) = reader(&rig, json!({ "consumer": "slow" })).await;
    assert_eq!(answer["from"], 0);
    let got = read_until(&mut op, Duration::from_secs(30), "gap and 5", |g| {
        count_messages(g) >= 5
    })
    .await;
    let Got::Gap(gap) = &got[0] else {
        panic!("the first event is not chat.gap: {got:?}");
    };
    let first = messages(&got)[0]["cursor"].as_u64().expect("cursor");
    assert_eq!(gap["account"], "nova", "{gap}");
    assert_eq!(gap["from"], 1, "{gap}");
    assert_eq!(
        gap["to"].as_u64(),
        Some(first - 1),
        "{gap} then cursor {first}"
    );
    let expected: Vec<String> = (7..12).map(|i| format!("g {i:02}")).collect();
    assert_eq!(bodies(&got), expected);
    assert_eq!(got.iter().filter(|g| matches!(g, Got::Gap(_))).count(), 1);
}

/// Test 6: `chat.send` with the same `txn_id` twice, with a restart in between: one
/// message in the room, the same `event_id`. Then `warden call chat.send` across a
/// gateway restart (the send stalled at the proxy when warden stops) succeeds once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_send_with_a_txn_id_posts_once_across_restarts_and_warden_call_retries_it() {
    let Some(hs) = synapse::require!() else {
        return;
    };
    let proxy = FaultProxy::start(hs.addr()).await.expect("proxy");
    let port = free_port();
    let bind = |s: Scenario| s.gateway_bind(&format!("127.0.0.1:{port}"));
    let (scenario, rig, owner, room) = one_account(hs, "ibsend", Some(&proxy.url()), bind).await;
    let params = json!({ "account": "nova", "room_id": room, "body": "once", "txn_id": "t-1" });
    // The account may not have synced its join yet: until then the send is refused.
    let first = crate::support::eventually(Duration::from_secs(30), "the first send", async || {
        rig.chat_send(params.clone()).await
    })
    .await;
    let rig = restart(&scenario, rig, "nova").await;
    let second = rig.chat_send(params).await.expect("send again");
    assert_eq!(first["event_id"], second["event_id"]);
    let posted = |body: &'static str| {
        let owner = owner.clone();
        let room = room.clone();
        async move {
            owner
                .messages(&room, 100)
                .await
                .iter()
                .filter(|m| m.body.as_deref() == Some(body))
                .count()
        }
    };
    assert_eq!(posted("once").await, 1, "one message in the room");

    // A crash after the homeserver took a send but before the inbox recorded it: the
    // repeat goes to the homeserver again, with the same transaction ID, and it keeps one.
    let params = json!({ "account": "nova", "room_id": room, "body": "staged", "txn_id": "t-2" });
    let posted_first = rig.chat_send(params.clone()).await.expect("send");
    stop(rig).await;
    let forgotten = inbox_file(&scenario)
        .execute("DELETE FROM sends WHERE txn_id = 't-2'", [])
        .expect("forget the record");
    assert_eq!(forgotten, 1);
    let rig = scenario.start().await;
    rig.wait_ready("nova", Duration::from_secs(30)).await;
    let posted_again = rig.chat_send(params).await.expect("send again");
    assert_eq!(posted_first["event_id"], posted_again["event_id"]);
    assert_eq!(posted("staged").await, 1, "the homeserver kept one");

    // The send hangs at the proxy (new connections stall, the open ones are reset) ...
    proxy.set_mode(Mode::Stall).await;
    proxy.reset_all().await;
    let url = format!("ws://127.0.0.1:{port}/ws");
    let call_params = json!({ "account": "nova", "room_id": room, "body": "retried" }).to_string();
    let call = Launch::new(
        "inbox-call",
        &[
            "call",
            "chat.send",
            "--gateway",
            &url,
            "--token",
            TOKEN,
            "--params",
            &call_params,
        ],
    )
    .spawn();
    crate::support::eventually(
        Duration::from_secs(20),
        "the send reaches the proxy",
        async || proxy.accepted() > 0,
    )
    .await;
    // ... while the gateway restarts under it; Synapse is reachable again after.
    stop(rig).await;
    proxy.set_mode(Mode::Forward).await;
    let rig = scenario.start().await;
    let (code, stdout, stderr) = call.finish(Duration::from_secs(60)).await;
    assert_eq!(
        code,
        0,
        "stdout: {stdout}\nstderr: {stderr:#?}\nwarden: {}",
        rig.warden.logs()
    );
    let answer: Value = serde_json::from_str(&stdout).expect("JSON answer");
    assert!(
        answer["event_id"]
            .as_str()
            .is_some_and(|e| e.starts_with('$')),
        "{answer}"
    );
    assert!(
        stderr.iter().any(|l| l.contains("retrying")),
        "the call was retried across the restart: {stderr:#?}"
    );
    assert_eq!(posted("retried").await, 1, "posted once");
}

// ---------------------------------------------------------------------------------------
// The seam, on an in-process gateway with a real inbox
// ---------------------------------------------------------------------------------------

struct Gateway {
    state: GatewayState,
    inbox: Inbox,
    url: String,
    _tree: warden_actors::supervision::Tree,
    _dir: TempDir,
}

async fn gateway(name: &str, settings: InboxSettings) -> Gateway {
    let dir = TempDir::new(name);
    let state = GatewayState::new(GatewaySettings {
        bind: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        token: Some(TOKEN.to_string()),
        ..GatewaySettings::default()
    });
    let inbox =
        Inbox::open(&dir.join("inbox.sqlite3"), settings, state.hub().clone()).expect("inbox");
    assert!(state.chat().set_inbox(inbox.clone()).is_ok());
    let (tree, addr) = gateway_tree(&state).await;
    assert!(state.set_tree(tree.handle()).is_ok());
    Gateway {
        state,
        inbox,
        url: format!("ws://{addr}/ws"),
        _tree: tree,
        _dir: dir,
    }
}

fn stored(n: u64) -> NewMessage {
    NewMessage {
        account: "acct".to_string(),
        room_id: "!room:x".to_string(),
        event_id: format!("$e{n}"),
        sender: "@person:x".to_string(),
        body: format!("m {n}"),
        thread_root: None,
        origin_ts_ms: n,
        is_direct: false,
        mentioned: false,
    }
}

/// Test 3: messages stored while replays run are neither lost nor duplicated. 24 readers
/// start at random moments and positions while a writer stores 3,000 messages at a random
/// pace on top of 2,000 stored before; each must see every cursor after its start exactly
/// once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_then_live_has_no_gap_and_no_duplicate_at_the_seam() {
    const BEFORE: u64 = 2_000;
    const DURING: u64 = 3_000;
    const READERS: usize = 24;
    let gw = gateway("inbox-seam", InboxSettings::default()).await;
    let batch: Vec<NewMessage> = (1..=BEFORE).map(stored).collect();
    gw.inbox
        .commit("acct", batch, Some("s0".into()))
        .await
        .expect("commit");
    let seed: u64 = rand::random();
    eprintln!("seam test: seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    let writer = tokio::spawn({
        let inbox = gw.inbox.clone();
        let pauses: Vec<u64> = (0..DURING).map(|_| rng.random_range(0..400)).collect();
        async move {
            for (i, pause) in pauses.into_iter().enumerate() {
                let n = BEFORE + 1 + i as u64;
                inbox
                    .commit("acct", vec![stored(n)], Some(format!("s{n}")))
                    .await
                    .expect("commit");
                tokio::time::sleep(Duration::from_micros(pause)).await;
            }
        }
    });
    let mut readers = Vec::new();
    for r in 0..READERS {
        let start_after = Duration::from_micros(rng.random_range(0..1_500_000));
        let since = match rng.random_range(0..3) {
            0 => json!("earliest"),
            _ => json!(rng.random_range(0..BEFORE)),
        };
        let url = gw.url.clone();
        readers.push(tokio::spawn(async move {
            tokio::time::sleep(start_after).await;
            let mut op = operator(&url, TOKEN).await.expect("operator");
            let answer = op
                .call(
                    "subscribe",
                    json!({ "events": ["chat.message"], "since": since }),
                )
                .await
                .expect("subscribe");
            let from = answer["from"].as_u64().expect("from");
            let mut next = from + 1;
            let last = BEFORE + DURING;
            while next <= last {
                match tokio::time::timeout(Duration::from_secs(60), op.next_event()).await {
                    Ok(Ok(Incoming::Event { event, payload })) if event == "chat.message" => {
                        let cursor = payload["cursor"].as_u64().expect("cursor");
                        assert_eq!(
                            cursor,
                            next,
                            "reader {r} (since {since}): after {}",
                            next - 1
                        );
                        next += 1;
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => panic!("reader {r}: {e}"),
                    Err(_) => panic!("reader {r}: stuck after cursor {}", next - 1),
                }
            }
            (from, r)
        }));
    }
    writer.await.expect("writer");
    for reader in readers {
        let (from, r) = reader
            .await
            .expect("a reader saw every cursor once, in order");
        assert!(from <= BEFORE, "reader {r} started at {from}");
    }
}

/// Bad replay requests are refused with an error naming what was wrong, and approvers
/// cannot read people's messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_replay_requests_are_refused_naming_what_is_wrong() {
    let gw = gateway(
        "inbox-bad",
        InboxSettings {
            max_consumers: 1,
            ..InboxSettings::default()
        },
    )
    .await;
    gw.inbox
        .commit("acct", vec![stored(1)], Some("s".into()))
        .await
        .expect("commit");
    let cases = [
        (
            json!({ "events": ["chat.message"], "since": "latest" }),
            "bad_request",
            "since must be a cursor",
        ),
        (
            json!({ "events": ["chat.message"], "since": -1 }),
            "bad_request",
            "since must be a cursor",
        ),
        (
            json!({ "events": ["chat.message"], "since": 2 }),
            "bad_request",
            "past the newest message (1)",
        ),
        (
            json!({ "events": ["tick"], "since": 0 }),
            "bad_request",
            "list it in events",
        ),
        (
            json!({ "events": ["chat.message"], "consumer": "no spaces" }),
            "bad_request",
            "consumer must be 1 to 64",
        ),
    ];
    for (params, code, needle) in cases {
        let mut op = operator(&gw.url, TOKEN).await.expect("operator");
        match op.call("subscribe", params.clone()).await {
            Err(CallError::Failed { code: got, message }) => {
                assert_eq!(got, code, "{params}: {message}");
                assert!(message.contains(needle), "{params}: {message}");
            }
            other => panic!("{params}: {other:?}"),
        }
    }
    let mut op = operator(&gw.url, TOKEN).await.expect("operator");
    op.call("chat.ack", json!({ "consumer": "one", "cursor": 1 }))
        .await
        .expect("the first consumer");
    match op
        .call("chat.ack", json!({ "consumer": "two", "cursor": 1 }))
        .await
    {
        Err(CallError::Failed { code, message }) => {
            assert_eq!(code, "too_large");
            assert!(message.contains("inbox.max_consumers"), "{message}");
        }
        other => panic!("a second consumer: {other:?}"),
    }
    // A session already live on chat.message cannot start a replay on top of it.
    op.call("subscribe", json!({ "events": ["chat.message"] }))
        .await
        .expect("live");
    match op
        .call(
            "subscribe",
            json!({ "events": ["chat.message"], "since": 0 }),
        )
        .await
    {
        Err(CallError::Failed { code, message }) => {
            assert_eq!(code, "bad_request");
            assert!(
                message.contains("already receives chat.message"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Replays and the live stream carry the same payload, with the cursor.
    let mut replayed = operator(&gw.url, TOKEN).await.expect("operator");
    replayed
        .call(
            "subscribe",
            json!({ "events": ["chat.message"], "since": 0 }),
        )
        .await
        .expect("replay");
    let got = read_until(&mut replayed, Duration::from_secs(10), "one", |g| {
        count_messages(g) >= 1
    })
    .await;
    let expected = json!({
        "cursor": 1, "account": "acct", "room_id": "!room:x", "sender": "@person:x",
        "event_id": "$e1", "body": "m 1", "is_direct": false, "mentioned": false,
    });
    assert_eq!(messages(&got)[0], &expected);
    // An approver serves one account's approvals: people's messages are not its to read.
    let credential = gw.state.add_approver("acct");
    let client = ClientInfo {
        name: "it".into(),
        version: "0".into(),
    };
    let mut options = ConnectOptions::new(Role::Approver, credential.expose(), client);
    options.account = Some("acct".to_string());
    let (mut approver, _) = GatewayClient::connect(&gw.url, options)
        .await
        .expect("approver connects");
    match approver
        .call(
            "subscribe",
            json!({ "events": ["approval.requested", "chat.message"] }),
        )
        .await
    {
        Err(CallError::Failed { code, message }) => {
            assert_eq!(code, "forbidden");
            assert!(
                message.contains("chat.message is for operators"),
                "{message}"
            );
        }
        other => panic!("an approver reading chat.message: {other:?}"),
    }
}
