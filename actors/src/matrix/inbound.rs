//! Which room messages become `chat.message` events, and which invites are accepted.
//!
//! A message is forwarded when it is a text or emote (notices are other bots' output and
//! edits are not new messages), it was not sent by the account itself, its room is allowed
//! (`allowed_rooms` empty = every joined room) and its sender is allowed (`allowed_senders`:
//! full IDs, case-insensitive; empty = nobody; `*` = anyone). Each event ID is forwarded at
//! most once per process, however often a restarted sync hands it over again.

use std::collections::{HashSet, VecDeque};

/// How many recent event IDs are remembered to drop repeats.
const SEEN_CAPACITY: usize = 4096;

/// The account's filters.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    rooms: HashSet<String>,
    senders: HashSet<String>,
    anyone: bool,
}

impl Filter {
    pub fn new(allowed_rooms: &[String], allowed_senders: &[String]) -> Self {
        Self {
            rooms: allowed_rooms.iter().cloned().collect(),
            senders: allowed_senders
                .iter()
                .map(|s| s.to_ascii_lowercase())
                .collect(),
            anyone: allowed_senders.iter().any(|s| s == "*"),
        }
    }

    /// Whether the account acts in `room_id`.
    pub fn room_allowed(&self, room_id: &str) -> bool {
        self.rooms.is_empty() || self.rooms.contains(room_id)
    }

    /// Whether `sender`'s messages (and invites) are acted on.
    pub fn sender_allowed(&self, sender: &str) -> bool {
        self.anyone || self.senders.contains(&sender.to_ascii_lowercase())
    }
}

/// Recently forwarded event IDs, oldest first out.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl Seen {
    /// True the first time `event_id` is offered.
    pub fn first_time(&mut self, event_id: &str) -> bool {
        if self.set.contains(event_id) {
            return false;
        }
        if self.order.len() == SEEN_CAPACITY
            && let Some(oldest) = self.order.pop_front()
        {
            self.set.remove(&oldest);
        }
        self.set.insert(event_id.to_string());
        self.order.push_back(event_id.to_string());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn senders_match_case_insensitively_empty_is_nobody_and_star_is_anyone() {
        let nobody = Filter::new(&[], &[]);
        assert!(!nobody.sender_allowed("@owner:localhost"));
        let owner = Filter::new(&[], &strings(&["@Owner:localhost"]));
        assert!(owner.sender_allowed("@owner:LOCALHOST"));
        assert!(!owner.sender_allowed("@mallory:localhost"));
        let anyone = Filter::new(&[], &strings(&["*"]));
        assert!(anyone.sender_allowed("@mallory:localhost"));
    }

    #[test]
    fn rooms_empty_is_every_room_otherwise_exact_ids() {
        assert!(Filter::new(&[], &[]).room_allowed("!a:x"));
        let one = Filter::new(&strings(&["!a:x"]), &[]);
        assert!(one.room_allowed("!a:x"));
        assert!(!one.room_allowed("!b:x"));
    }

    #[test]
    fn seen_drops_repeats_and_forgets_the_oldest_beyond_capacity() {
        let mut seen = Seen::default();
        assert!(seen.first_time("$0"));
        assert!(!seen.first_time("$0"));
        for i in 1..=SEEN_CAPACITY {
            assert!(seen.first_time(&format!("${i}")));
        }
        assert!(seen.first_time("$0"), "the oldest was forgotten");
        assert!(!seen.first_time(&format!("${SEEN_CAPACITY}")));
        assert_eq!(seen.order.len(), SEEN_CAPACITY);
    }
}
