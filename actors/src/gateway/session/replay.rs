//! Replay: a session that subscribes to `chat.message` with `since` or `consumer` first
//! gets the stored messages after its position, then the live ones, with no gap and no
//! duplicate at the seam.
//!
//! The seam: the hub receiver is handed to the pump at the `subscribe`, before the first
//! page is read. A message is published on the hub only after it is stored, in cursor
//! order (`inbox/mod.rs`). While replaying, the session drops live `chat.message` events
//! but remembers the highest cursor among them. A page shorter than [`PAGE`] ends the
//! replay only when no live event above the last replayed cursor was seen; otherwise
//! another page is read (that message is stored, so the page finds it). From then on a
//! live event is sent when its cursor is above the last one sent. Every message is thus
//! sent once: from a page if it was stored before the last page was read, live otherwise.
//!
//! Before a page's messages, each account whose trimmed-through cursor is above the
//! position gets one `chat.gap {account, from, to}` (once per session and cursor).
//!
//! Pages are read off the actor, one at a time, and come back as [`ReplayMsg`]; each is
//! written to the socket before the next is asked for, so a replay goes as fast as the
//! client reads. The answer to the `subscribe` is sent once the start is known (`{events,
//! from}`), before the first replayed message.

use std::collections::HashMap;

use axum::extract::ws::Message;
use ractor::ActorRef;
use serde_json::json;
use tracing::{Instrument, warn};

use super::super::chat::{GAP_EVENT, MESSAGE_EVENT};
use super::super::hub::HubEvent;
use super::super::protocol::{Frame, close, code};
use super::{SessionMsg, SessionState};
use crate::inbox::{Gap, Inbox, InboxError, PAGE, Page, Since, Stored};

/// How long a page read waits before asking a busy inbox again.
const BUSY_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// Where a session's `chat.message` events come from: the seam's state machine, kept
/// free of sockets so that every interleaving of pages and live events can be tested.
#[derive(Debug, Default)]
pub(super) enum Feed {
    /// Live events as they come (no `since`, no `consumer`).
    #[default]
    Live,
    /// Reading stored pages.
    Replaying(Replay),
    /// Replayed up to `sent`; live events above it are sent.
    Caught {
        /// The highest cursor sent.
        sent: u64,
    },
}

/// A replay in progress.
#[derive(Debug, Default)]
pub(super) struct Replay {
    /// The highest cursor sent (or the start).
    position: u64,
    /// The highest cursor of a live `chat.message` dropped meanwhile.
    newest_live: u64,
    /// The trimmed-through cursor last reported (or skipped) per account.
    gaps: HashMap<String, u64>,
}

/// What a page gives the client, in order.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Out {
    /// A `chat.gap`.
    Gap(Gap),
    /// A replayed `chat.message`.
    Message(Stored),
}

impl Feed {
    /// A replay starting at `position`, not reporting the gaps of `skip`.
    fn started(&mut self, position: u64, skip: Vec<Gap>) {
        if let Feed::Replaying(replay) = self {
            replay.position = position;
            for gap in skip {
                replay.gaps.insert(gap.account, gap.to);
            }
        }
    }

    /// A live `chat.message` with `cursor` (`None`: not from the inbox): whether to send it.
    pub(super) fn live(&mut self, cursor: Option<u64>) -> bool {
        match (self, cursor) {
            (Feed::Replaying(replay), Some(cursor)) => {
                replay.newest_live = replay.newest_live.max(cursor);
                false
            }
            (Feed::Caught { sent }, Some(cursor)) => {
                if cursor <= *sent {
                    return false;
                }
                *sent = cursor;
                true
            }
            _ => true,
        }
    }

    /// A page read after the position: what to send, and the position to read the next
    /// page after (`None`: the replay is over, live events take over).
    pub(super) fn page(&mut self, page: Page) -> (Vec<Out>, Option<u64>) {
        let Feed::Replaying(replay) = self else {
            return (Vec::new(), None);
        };
        let mut out = Vec::new();
        for gap in page.gaps {
            let reported = replay.gaps.get(&gap.account).copied().unwrap_or(0);
            if gap.to > reported {
                replay.gaps.insert(gap.account.clone(), gap.to);
                out.push(Out::Gap(gap));
            }
        }
        let full = page.messages.len() >= PAGE;
        for message in page.messages {
            if message.cursor > replay.position {
                replay.position = message.cursor;
                out.push(Out::Message(message));
            }
        }
        let position = replay.position;
        // A short page ends the replay only if no live message above it was dropped: such
        // a message is stored, so one more page finds it.
        if full || replay.newest_live > position {
            (out, Some(position))
        } else {
            *self = Feed::Caught { sent: position };
            (out, None)
        }
    }
}

/// A replay step worked out off the actor.
#[derive(Debug)]
pub enum ReplayMsg {
    /// The start: the subscribe's request id, the position and the gaps not to report.
    Started {
        /// The `subscribe` request.
        id: String,
        /// Its answer's event names.
        events: Vec<String>,
        /// The position, or why it could not be found.
        start: Result<(u64, Vec<Gap>), InboxError>,
    },
    /// The next page, or why it could not be read.
    Page(Result<Page, InboxError>),
}

/// The wire error of an inbox failure.
pub(super) fn refusal(e: &InboxError) -> &'static str {
    match e {
        InboxError::BadRequest(_) => code::BAD_REQUEST,
        InboxError::TooMany(_) => code::TOO_LARGE,
        InboxError::Busy => code::BUSY,
        InboxError::Store { .. } | InboxError::Closed => code::INTERNAL,
    }
}

impl SessionState {
    /// Starts a replay for the `subscribe` request `id`: the start is looked up off the
    /// actor and answered by [`ReplayMsg::Started`].
    pub(super) fn start_replay(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        inbox: Inbox,
        id: String,
        events: Vec<String>,
        consumer: Option<String>,
        since: Option<Since>,
    ) {
        self.feed = Feed::Replaying(Replay {
            position: 0,
            newest_live: 0,
            gaps: HashMap::new(),
        });
        let me = myself.clone();
        let start = async move {
            let start = inbox.start(consumer, since).await;
            let _ = me.send_message(SessionMsg::Replay(ReplayMsg::Started { id, events, start }));
        };
        self.replay_task = Some(tokio::spawn(start.instrument(self.span.clone())).into());
    }

    /// Reads the page after the position, off the actor.
    fn next_page(&mut self, myself: &ActorRef<SessionMsg>, after: u64) {
        let Some(inbox) = self.gateway.chat().inbox().cloned() else {
            return;
        };
        let me = myself.clone();
        let read = async move {
            // A writer with its queue full is busy for moments: wait, do not fail the reader.
            let page = loop {
                match inbox.page(after, PAGE).await {
                    Err(InboxError::Busy) => tokio::time::sleep(BUSY_PAUSE).await,
                    page => break page,
                }
            };
            let _ = me.send_message(SessionMsg::Replay(ReplayMsg::Page(page)));
        };
        self.replay_task = Some(tokio::spawn(read.instrument(self.span.clone())).into());
    }

    /// A replay step.
    pub(super) async fn on_replay(&mut self, myself: &ActorRef<SessionMsg>, msg: ReplayMsg) {
        match msg {
            ReplayMsg::Started { id, events, start } => match start {
                Ok((position, skip)) => {
                    self.feed.started(position, skip);
                    let answer = Frame::ok(id, json!({ "events": events, "from": position }));
                    if self.send(myself, &answer).await {
                        self.next_page(myself, position);
                    }
                }
                Err(e) => {
                    self.feed = Feed::Live;
                    self.subscriptions.remove(MESSAGE_EVENT);
                    let frame = Frame::err(id, refusal(&e), e.to_string());
                    self.send(myself, &frame).await;
                }
            },
            ReplayMsg::Page(Ok(page)) => self.on_page(myself, page).await,
            ReplayMsg::Page(Err(e)) => {
                warn!(peer = %self.peer, error = %e, "A replay could not read the inbox; closing with 1011.");
                self.close(
                    myself,
                    close::INTERNAL_ERROR,
                    "the inbox failed; reconnect and resume",
                )
                .await;
            }
        }
    }

    async fn on_page(&mut self, myself: &ActorRef<SessionMsg>, page: Page) {
        let (out, next) = self.feed.page(page);
        let inbox = self.gateway.chat().inbox().cloned();
        for item in out {
            let (frame, marks) = match item {
                Out::Gap(gap) => (Frame::event(GAP_EVENT, json!(gap)), None),
                Out::Message(m) => {
                    let marks = Some((m.message.account.clone(), m.cursor));
                    (Frame::event(MESSAGE_EVENT, json!(m.to_chat())), marks)
                }
            };
            if !self.send(myself, &frame).await {
                return;
            }
            if let (Some((account, cursor)), Some(inbox)) = (marks, &inbox) {
                inbox.delivered(&account, cursor);
            }
        }
        if let Some(after) = next {
            self.next_page(myself, after);
        }
    }

    /// A live `chat.message`: sent unless a replay covers it (or will).
    pub(super) async fn on_live_message(&mut self, myself: &ActorRef<SessionMsg>, ev: &HubEvent) {
        if !self
            .feed
            .live(ev.stored.as_ref().map(|(cursor, _)| *cursor))
        {
            return;
        }
        let text = ev.text.to_string();
        if self.write(myself, Message::Text(text.into())).await
            && let (Some((cursor, account)), Some(inbox)) =
                (&ev.stored, self.gateway.chat().inbox())
        {
            inbox.delivered(account, *cursor);
        }
    }
}

#[cfg(test)]
mod tests;
