//! Which room messages become `chat.message` events, and which invites are accepted.
//!
//! A message is forwarded when it is a text or emote (notices are other bots' output and
//! edits are not new messages), it was not sent by the account itself, its room is allowed
//! (`allowed_rooms` empty = every joined room) and its sender is allowed (`allowed_senders`:
//! full IDs, case-insensitive; empty = nobody; `*` = anyone). Each event ID is stored (and
//! so forwarded) at most once per account, however often a restarted sync hands it over
//! again: the inbox's `UNIQUE (account, event_id)`.

use std::collections::HashSet;

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
}
