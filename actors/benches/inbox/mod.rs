//! The inbox's sections of the gateway benchmark (issue 12's goals; see `BENCHMARKS.md`,
//! "Inbox"). A real inbox file (WAL, `synchronous = FULL`) in a scratch directory under
//! the system's temporary directory, the real writer thread, a real gateway and client.
//!
//! * `inbox-append` — 8 accounts commit concurrently, 50 messages per commit (one sync
//!   response each), until 100,000 are stored; and one account committing one message
//!   at a time. Goal: ≥ 20,000 messages/s with durable, batched commits.
//! * `inbox-replay` — 100,000 stored messages replayed to one `subscribe {since:
//!   "earliest"}` over a real socket, until the client has read the last. Goal: ≤ 2 s.
//! * `inbox-latency` — one message at a time from "the account has it" to "the operator
//!   read it": through the inbox (`Chat::commit`: stored, then published) and, for
//!   comparison, the old live path (`Chat::deliver`: published at once). Goal: p99 of the
//!   difference ≤ 2 ms.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::runtime::Runtime;
use warden_actors::gateway::client::{GatewayClient, Incoming};
use warden_actors::gateway::{GatewaySettings, GatewayState};
use warden_actors::inbox::{Inbox, InboxSettings, NewMessage};

use super::common::{Report, Size, Stats, ms};
use warden_actors::gateway::protocol::Role;

use super::{InProcess, options, thousands};

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("warden-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Self(dir)
    }

    fn file(&self) -> PathBuf {
        self.0.join("inbox.sqlite3")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn message(account: &str, n: u64) -> NewMessage {
    NewMessage {
        account: account.to_string(),
        room_id: "!bench:localhost".to_string(),
        event_id: format!("$bench-{account}-{n}"),
        sender: "@person:localhost".to_string(),
        body: format!("message {n}: a line of about the length people write to an agent"),
        thread_root: None,
        origin_ts_ms: n,
        is_direct: false,
        mentioned: false,
    }
}

pub fn bench_append(report: &mut Report, size: Size, rt: &Runtime) {
    let total: u64 = size.pick(2_000, 20_000, 100_000);
    const ACCOUNTS: u64 = 8;
    const PER_COMMIT: u64 = 50;
    let scratch = Scratch::new("append");
    let hub = GatewayState::new(GatewaySettings::default()).hub().clone();
    let inbox = Inbox::open(&scratch.file(), InboxSettings::default(), hub.clone()).expect("inbox");
    let per_account = total / ACCOUNTS;
    let started = Instant::now();
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for a in 0..ACCOUNTS {
            let inbox = inbox.clone();
            tasks.spawn(async move {
                let account = format!("acct{a}");
                let mut n = 0;
                while n < per_account {
                    let batch = (n..(n + PER_COMMIT).min(per_account))
                        .map(|i| message(&account, i))
                        .collect();
                    n += PER_COMMIT;
                    inbox
                        .commit(&account, batch, Some(format!("s{n}")))
                        .await
                        .expect("commit");
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("an account");
        }
    });
    let took = started.elapsed();
    let rate = (per_account * ACCOUNTS) as f64 / took.as_secs_f64();
    println!(
        "inbox-append: {} messages by {ACCOUNTS} accounts, {PER_COMMIT} per commit, in {:.2} s",
        thousands(per_account * ACCOUNTS),
        took.as_secs_f64()
    );
    report.add(
        "inbox-append",
        &format!("{ACCOUNTS} accounts × {PER_COMMIT}/commit"),
        format!("{} msg/s", thousands(rate as u64)),
        "≥ 20,000 msg/s",
        Some(rate >= 20_000.0),
    );

    // One account, one message per commit: every message its own fsync'd transaction.
    let single: u64 = size.pick(100, 1_000, 3_000);
    let mut latencies = Vec::with_capacity(single as usize);
    let started = Instant::now();
    rt.block_on(async {
        for i in 0..single {
            let t = Instant::now();
            inbox
                .commit("single", vec![message("single", i)], Some(format!("s{i}")))
                .await
                .expect("commit");
            latencies.push(t.elapsed());
        }
    });
    let rate = single as f64 / started.elapsed().as_secs_f64();
    let stats = Stats::of(&latencies);
    report.add(
        "inbox-append",
        "1 account × 1/commit",
        format!("{} msg/s", thousands(rate as u64)),
        "(one fsync each)",
        None,
    );
    report.add(
        "inbox-append",
        "commit p50 / p99",
        format!("{} / {}", ms(stats.p50), ms(stats.p99)),
        "",
        None,
    );
}

/// The in-process gateway with an inbox in `scratch`.
fn with_inbox(gw_rt: &Runtime, scratch: &Scratch) -> (InProcess, Inbox) {
    let gw = InProcess::start(gw_rt);
    let hub = gw.state.hub().clone();
    let inbox = Inbox::open(&scratch.file(), InboxSettings::default(), hub).expect("inbox");
    assert!(gw.state.chat().set_inbox(inbox.clone()).is_ok());
    (gw, inbox)
}

pub fn bench_replay(report: &mut Report, size: Size, gw_rt: &Runtime, client_rt: &Runtime) {
    let total: u64 = size.pick(2_000, 20_000, 100_000);
    let scratch = Scratch::new("replay");
    let (gw, inbox) = with_inbox(gw_rt, &scratch);
    let url = gw.url();
    gw_rt.block_on(async {
        let mut n = 0;
        while n < total {
            let batch = (n..(n + 1_000).min(total))
                .map(|i| message("acct", i))
                .collect();
            n += 1_000;
            inbox
                .commit("acct", batch, Some(format!("s{n}")))
                .await
                .expect("commit");
        }
    });
    let took = client_rt.block_on(async {
        let (mut client, _) = GatewayClient::connect(&url, options(Role::Operator, 0))
            .await
            .expect("connect");
        let started = Instant::now();
        client
            .call(
                "subscribe",
                json!({ "events": ["chat.message"], "since": "earliest" }),
            )
            .await
            .expect("subscribe");
        let mut got = 0;
        while got < total {
            match client.next_event().await.expect("an event") {
                Incoming::Event { event, .. } if event == "chat.message" => got += 1,
                _ => {}
            }
        }
        started.elapsed()
    });
    println!(
        "inbox-replay: {} messages in {:.2} s ({} msg/s)",
        thousands(total),
        took.as_secs_f64(),
        thousands((total as f64 / took.as_secs_f64()) as u64)
    );
    report.add(
        "inbox-replay",
        &format!("{} messages, since earliest", thousands(total)),
        format!("{:.2} s", took.as_secs_f64()),
        "≤ 2 s (100,000)",
        Some(took <= Duration::from_secs(2)),
    );
    gw.stop(gw_rt);
}

pub fn bench_latency(report: &mut Report, size: Size, gw_rt: &Runtime, client_rt: &Runtime) {
    let samples: usize = size.pick(100, 1_000, 3_000);
    let scratch = Scratch::new("latency");
    let (gw, _inbox) = with_inbox(gw_rt, &scratch);
    let (state, url) = (&gw.state, gw.url());
    let chat = Arc::new(state.chat().clone());
    let mut client = client_rt.block_on(async {
        let (mut client, _) = GatewayClient::connect(&url, options(Role::Operator, 0))
            .await
            .expect("connect");
        client
            .call("subscribe", json!({ "events": ["chat.message"] }))
            .await
            .expect("subscribe");
        client
    });
    let mut measure = |through_inbox: bool, base: u64| -> Vec<Duration> {
        let mut out = Vec::with_capacity(samples);
        for i in 0..samples as u64 {
            let n = base + i;
            let started = Instant::now();
            let chat = chat.clone();
            gw_rt.spawn(async move {
                if through_inbox {
                    chat.commit("acct", vec![message("acct", n)], Some(format!("s{n}")))
                        .await
                        .expect("commit");
                } else {
                    chat.deliver(&message("acct", n).into_chat(None));
                }
            });
            client_rt.block_on(async {
                loop {
                    match client.next_event().await.expect("an event") {
                        Incoming::Event { event, .. } if event == "chat.message" => break,
                        _ => {}
                    }
                }
            });
            out.push(started.elapsed());
        }
        out
    };
    let live = Stats::of(&measure(false, 0));
    let stored = Stats::of(&measure(true, 1_000_000));
    let added_p99 = stored.p99 - live.p99;
    report.add(
        "inbox-latency",
        "live path p50 / p99",
        format!("{} / {}", ms(live.p50), ms(live.p99)),
        "(before the inbox)",
        None,
    );
    report.add(
        "inbox-latency",
        "through the inbox p50 / p99",
        format!("{} / {}", ms(stored.p50), ms(stored.p99)),
        "",
        None,
    );
    report.add(
        "inbox-latency",
        "added p50 / p99",
        format!("{} / {}", ms(stored.p50 - live.p50), ms(added_p99)),
        "p99 ≤ 2 ms",
        Some(added_p99 <= 2_000.0),
    );
    drop(client);
    gw.stop(gw_rt);
}
