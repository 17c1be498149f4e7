//! The seam as a model: a writer that stores and then publishes, page reads that see what
//! was stored when they ran, and the session's mailbox taking page answers and live events
//! in any interleaving the two channels allow. Every run must give the client each cursor
//! after its start exactly once, in order.

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

fn stored(cursor: u64) -> Stored {
    Stored {
        cursor,
        message: crate::inbox::NewMessage {
            account: "a".into(),
            room_id: "!r:x".into(),
            event_id: format!("$e{cursor}"),
            sender: "@p:x".into(),
            body: String::new(),
            thread_root: None,
            origin_ts_ms: 0,
        },
        stored_ms: 0,
    }
}

/// What the store holds after `after` when a page is read.
fn read(after: u64, head: u64) -> Page {
    let last = head.min(after + PAGE as u64);
    Page {
        gaps: Vec::new(),
        messages: (after + 1..=last).map(stored).collect(),
    }
}

/// One random run; returns what the client got and what it should have got.
fn run(rng: &mut StdRng) -> (Vec<u64>, Vec<u64>) {
    let stored_before: u64 = rng.random_range(0..3 * PAGE as u64);
    let writes: u64 = rng.random_range(0..2 * PAGE as u64);
    let start = rng.random_range(0..=stored_before);
    let mut head = stored_before;
    // Stored before the subscribe but published after it: live events too.
    let published_late = rng.random_range(0..=stored_before.min(5));
    let mut hub: VecDeque<u64> = (head - published_late + 1..=head).collect();
    let mut feed = Feed::Replaying(Replay::default());
    feed.started(start, Vec::new());
    // A page to read after this position, and a page read but not yet handled.
    let mut to_read = Some(start);
    let mut answered: Option<Page> = None;
    let mut got = Vec::new();
    loop {
        let mut steps = Vec::new();
        if head < stored_before + writes {
            steps.push(0);
        }
        if !hub.is_empty() {
            steps.push(1);
        }
        if to_read.is_some() {
            steps.push(2);
        }
        if answered.is_some() {
            steps.push(3);
        }
        let Some(&step) = steps.get(rng.random_range(0..steps.len().max(1))) else {
            break;
        };
        match step {
            // The writer stores the next message, then publishes it.
            0 => {
                head += 1;
                hub.push_back(head);
            }
            // The session takes the next live event.
            1 => {
                let cursor = hub.pop_front().expect("an event");
                if feed.live(Some(cursor)) {
                    got.push(cursor);
                }
            }
            // The page is read from the store as it is now.
            2 => answered = Some(read(to_read.take().expect("a request"), head)),
            // The session takes the page.
            _ => {
                let (out, next) = feed.page(answered.take().expect("a page"));
                for item in out {
                    if let Out::Message(m) = item {
                        got.push(m.cursor);
                    }
                }
                to_read = next;
            }
        }
    }
    (got, (start + 1..=head).collect())
}

#[test]
fn every_interleaving_of_pages_and_live_events_gives_each_cursor_once_in_order() {
    let seed: u64 = rand::random();
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..3000 {
        let (got, want) = run(&mut rng);
        assert_eq!(got, want, "run {i} of seed {seed}");
    }
}

#[test]
fn a_gap_is_reported_once_before_the_messages_and_not_for_an_earliest_start() {
    let gap = Gap {
        account: "a".into(),
        from: 1,
        to: 4,
    };
    let page = || Page {
        gaps: vec![gap.clone()],
        messages: vec![stored(5)],
    };
    let mut feed = Feed::Replaying(Replay::default());
    feed.started(0, Vec::new());
    feed.live(Some(9));
    let (out, next) = feed.page(page());
    assert_eq!(out, vec![Out::Gap(gap.clone()), Out::Message(stored(5))]);
    assert_eq!(next, Some(5), "a live message above was seen: read on");
    let (out, next) = feed.page(Page {
        gaps: vec![gap.clone()],
        messages: (6..=9).map(stored).collect(),
    });
    assert_eq!(out.len(), 4, "the gap is not repeated: {out:?}");
    assert_eq!(next, None);
    assert!(!feed.live(Some(9)) && feed.live(Some(10)));

    let mut earliest = Feed::Replaying(Replay::default());
    earliest.started(0, vec![gap.clone()]);
    let (out, _) = earliest.page(page());
    assert_eq!(out, vec![Out::Message(stored(5))]);
}
