//! The inbox through its handle: a real file in a scratch directory, the real writer.

use std::path::PathBuf;

use super::*;
use crate::gateway::hub::Hub;

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "warden-inbox-{name}-{}-{}",
            std::process::id(),
            now_ms()
        ));
        std::fs::create_dir_all(&dir).expect("scratch dir");
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
        room_id: "!room:x".to_string(),
        event_id: format!("$e{n}"),
        sender: "@person:x".to_string(),
        body: format!("message {n}"),
        thread_root: None,
        origin_ts_ms: n,
        is_direct: false,
        mentioned: false,
    }
}

#[tokio::test]
async fn a_commit_stores_once_publishes_in_cursor_order_and_survives_a_reopen() {
    let scratch = Scratch::new("commit");
    let hub = Hub::new();
    let mut events = hub.subscribe();
    {
        let inbox =
            Inbox::open(&scratch.file(), InboxSettings::default(), hub.clone()).expect("open");
        assert_eq!(inbox.position("a").await.expect("position"), None);
        let batch = vec![message("a", 1), message("a", 2), message("a", 1)];
        let cursors = inbox
            .commit("a", batch, Some("s1".into()))
            .await
            .expect("commit");
        assert_eq!(cursors, vec![1, 2]);
        // Re-delivered after a crash before the position moved: stored once.
        let again = inbox
            .commit(
                "a",
                vec![message("a", 2), message("a", 3)],
                Some("s2".into()),
            )
            .await
            .expect("commit");
        assert_eq!(again, vec![3]);
    }
    for want in 1..=3u64 {
        let ev = events.recv().await.expect("published");
        assert_eq!(ev.name, MESSAGE_EVENT);
        let frame: serde_json::Value = serde_json::from_str(&ev.text).expect("json");
        assert_eq!(frame["payload"]["cursor"], want, "{frame}");
        assert_eq!(frame["payload"]["body"], format!("message {want}"));
    }
    let inbox = Inbox::open(&scratch.file(), InboxSettings::default(), Hub::new()).expect("reopen");
    assert_eq!(
        inbox.position("a").await.expect("position").as_deref(),
        Some("s2")
    );
    let page = inbox.page(1, 10).await.expect("page");
    let cursors: Vec<u64> = page.messages.iter().map(|m| m.cursor).collect();
    assert_eq!(cursors, vec![2, 3]);
    assert!(page.gaps.is_empty());
}

#[tokio::test]
async fn consumers_are_bounded_acks_cannot_pass_the_head_and_positions_persist() {
    let scratch = Scratch::new("consumers");
    let settings = InboxSettings {
        max_consumers: 2,
        ..InboxSettings::default()
    };
    let inbox = Inbox::open(&scratch.file(), settings.clone(), Hub::new()).expect("open");
    let batch = (1..=5).map(|n| message("a", n)).collect();
    inbox
        .commit("a", batch, Some("s".into()))
        .await
        .expect("commit");
    assert_eq!(
        inbox
            .start(Some("one".into()), None)
            .await
            .expect("start")
            .0,
        0
    );
    assert_eq!(inbox.ack("one", 3).await.expect("ack"), 3);
    assert_eq!(inbox.ack("one", 2).await.expect("ack"), 3, "never back");
    let past = inbox.ack("one", 6).await.expect_err("past the head");
    assert!(
        matches!(&past, InboxError::BadRequest(m) if m.contains("past the newest")),
        "{past}"
    );
    inbox.ack("two", 1).await.expect("a second consumer");
    let third = inbox.ack("three", 1).await.expect_err("a third");
    assert!(
        matches!(&third, InboxError::TooMany(m) if m.contains("inbox.max_consumers")),
        "{third}"
    );
    let third = inbox
        .start(Some("three".into()), None)
        .await
        .expect_err("a third");
    assert!(matches!(third, InboxError::TooMany(_)));
    drop(inbox);
    let inbox = Inbox::open(&scratch.file(), settings, Hub::new()).expect("reopen");
    assert_eq!(
        inbox
            .start(Some("one".into()), None)
            .await
            .expect("start")
            .0,
        3
    );
    let stats = inbox.stats().await.expect("stats");
    assert_eq!(stats.head, 5);
    assert_eq!(stats.consumers["one"].lag, 2);
    assert_eq!(stats.consumers["two"].lag, 4);
}

#[tokio::test]
async fn trimming_gives_a_gap_to_a_reader_below_it_but_not_to_one_starting_at_the_earliest() {
    let scratch = Scratch::new("trim");
    let settings = InboxSettings {
        max_messages_per_account: 3,
        ..InboxSettings::default()
    };
    let inbox = Inbox::open(&scratch.file(), settings, Hub::new()).expect("open");
    inbox.ack("lagging", 0).await.expect("consumer at 0");
    let batch = (1..=5).map(|n| message("a", n)).collect();
    inbox
        .commit("a", batch, Some("s".into()))
        .await
        .expect("commit");
    let (position, skip) = inbox
        .start(Some("lagging".into()), None)
        .await
        .expect("start");
    assert_eq!(position, 0);
    assert!(skip.is_empty(), "a durable consumer is told about the gap");
    let page = inbox.page(position, PAGE).await.expect("page");
    assert_eq!(
        page.gaps,
        vec![Gap {
            account: "a".into(),
            from: 1,
            to: 2
        }]
    );
    let cursors: Vec<u64> = page.messages.iter().map(|m| m.cursor).collect();
    assert_eq!(cursors, vec![3, 4, 5]);
    let (position, skip) = inbox
        .start(None, Some(Since::Earliest))
        .await
        .expect("start");
    assert_eq!(
        (position, skip.len()),
        (0, 1),
        "the earliest reader skips the gap"
    );
    // A new name may be a consumer that was forgotten: it hears about the gap.
    let (position, skip) = inbox
        .start(Some("newcomer".into()), None)
        .await
        .expect("start");
    assert_eq!(
        (position, skip.len()),
        (0, 0),
        "a new consumer is told about the gap"
    );
    let stats = inbox.stats().await.expect("stats");
    assert_eq!(stats.accounts["a"].messages, 3);
    assert_eq!(stats.accounts["a"].trimmed_through, 2);
}

#[tokio::test]
async fn a_send_record_answers_the_first_event_id_and_survives_a_reopen() {
    let scratch = Scratch::new("sends");
    let inbox = Inbox::open(&scratch.file(), InboxSettings::default(), Hub::new()).expect("open");
    assert_eq!(inbox.sent("a", "t1").await.expect("sent"), None);
    let first = inbox
        .record_send("a", "t1", "!r:x", "$one")
        .await
        .expect("record");
    let second = inbox
        .record_send("a", "t1", "!r:x", "$two")
        .await
        .expect("record");
    assert_eq!((first.as_str(), second.as_str()), ("$one", "$one"));
    drop(inbox);
    let inbox = Inbox::open(&scratch.file(), InboxSettings::default(), Hub::new()).expect("reopen");
    assert_eq!(
        inbox.sent("a", "t1").await.expect("sent").as_deref(),
        Some("$one")
    );
}

#[test]
fn names_are_checked_with_a_message_naming_the_rule() {
    assert!(check_name("consumer", "agent-1.main_x", &[]).is_ok());
    for bad in ["", "has space", "ünï", &"x".repeat(MAX_NAME + 1)] {
        let e = check_name("consumer", bad, &[]).expect_err(bad);
        assert!(e.to_string().contains("consumer must be 1 to 64"), "{e}");
    }
    assert!(check_name("txn_id", "a~b", &['~']).is_ok());
    assert!(check_name("consumer", "a~b", &[]).is_err());
}
