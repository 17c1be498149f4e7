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
            is_direct: false,
            mentioned: false,
        },
        stored_ms: 0,
    }
}

/// What a reader got, in order.
#[derive(Debug)]
enum Seen {
    Gap(u64),
    Message(u64),
}

/// One random run, with a count retention of `keep` messages when given (the writer trims
/// the oldest as it stores new ones). Returns what the reader saw, where it started and
/// the head.
fn run(rng: &mut StdRng, keep: Option<u64>) -> (Vec<Seen>, u64, u64) {
    let stored_before: u64 = rng.random_range(0..3 * PAGE as u64);
    let writes: u64 = rng.random_range(0..2 * PAGE as u64);
    let start = rng.random_range(0..=stored_before);
    let mut head = stored_before;
    let kept_after = |head: u64| keep.map_or(0, |keep| head.saturating_sub(keep));
    let mut trimmed = kept_after(stored_before);
    // Stored before the subscribe but published after it: live events too.
    let published_late = rng.random_range(0..=stored_before.min(5));
    let mut hub: VecDeque<u64> = (head - published_late + 1..=head).collect();
    let mut feed = Feed::Replaying(Replay::default());
    feed.started(start, Vec::new());
    // A page to read after this position, and a page read but not yet handled.
    let mut to_read = Some(start);
    let mut answered: Option<Page> = None;
    let mut seen = Vec::new();
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
            // The writer stores the next message (trimming the oldest), then publishes it.
            0 => {
                head += 1;
                trimmed = trimmed.max(kept_after(head));
                hub.push_back(head);
            }
            // The session takes the next live event.
            1 => {
                let cursor = hub.pop_front().expect("an event");
                if feed.live(Some(cursor)) {
                    seen.push(Seen::Message(cursor));
                }
            }
            // The page is read from the store as it is now: a gap for what was trimmed
            // above the position, then the messages still kept.
            2 => {
                let after = to_read.take().expect("a request");
                let first = after.max(trimmed);
                let last = head.min(first + PAGE as u64);
                let gaps = (trimmed > after)
                    .then(|| Gap {
                        account: "a".into(),
                        from: after + 1,
                        to: trimmed,
                    })
                    .into_iter()
                    .collect();
                answered = Some(Page {
                    gaps,
                    messages: (first + 1..=last).map(stored).collect(),
                });
            }
            // The session takes the page.
            _ => {
                let (out, next) = feed.page(answered.take().expect("a page"));
                for item in out {
                    seen.push(match item {
                        Out::Gap(gap) => Seen::Gap(gap.to),
                        Out::Message(m) => Seen::Message(m.cursor),
                    });
                }
                to_read = next;
            }
        }
    }
    (seen, start, head)
}

#[test]
fn every_interleaving_of_pages_and_live_events_gives_each_cursor_once_in_order() {
    let seed: u64 = rand::random();
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..3000 {
        let (seen, start, head) = run(&mut rng, None);
        let got: Vec<u64> = seen
            .iter()
            .map(|s| match s {
                Seen::Message(cursor) => *cursor,
                Seen::Gap(to) => panic!("run {i} of seed {seed}: a gap to {to} with no retention"),
            })
            .collect();
        let want: Vec<u64> = (start + 1..=head).collect();
        assert_eq!(got, want, "run {i} of seed {seed}");
    }
}

#[test]
fn with_retention_every_cursor_is_sent_once_in_order_or_reported_in_a_gap_before_what_follows() {
    let seed: u64 = rand::random();
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..3000 {
        let keep = rng.random_range(1..2 * PAGE as u64);
        let (seen, start, head) = run(&mut rng, Some(keep));
        let what = format!("run {i} of seed {seed} (keep {keep}, start {start}, head {head})");
        // `done`: every cursor up to it was sent or reported trimmed.
        let mut done = start;
        let mut reported = start;
        for item in &seen {
            match *item {
                Seen::Gap(to) => reported = reported.max(to),
                Seen::Message(cursor) => {
                    assert!(cursor > done, "{what}: {cursor} again or out of order");
                    assert!(
                        cursor == done + 1 || reported >= cursor - 1,
                        "{what}: {} to {} skipped without a gap",
                        done + 1,
                        cursor - 1
                    );
                    done = cursor;
                }
            }
        }
        assert!(done == head || reported >= head, "{what}: ended at {done}");
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
