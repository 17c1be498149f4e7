//! The gateway's side of chat channels: accounts register here, inbound messages become
//! `chat.message` events, and `chat.send` finds the account to send through.
//!
//! The gateway knows nothing about Matrix: an account is anything that implements
//! [`ChatAccount`]. The Matrix client actors (`actors/src/matrix/`) register one per
//! configured alias when the tree is built, before any of them has started, so `chat.send`
//! can tell an unknown account (`unknown_account`) from one that is not ready yet
//! (`account_not_ready`).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::hub::Hub;
use super::protocol::code;
use crate::inbox::{Inbox, InboxError, NewMessage, check_name};

/// Name of the event an inbound message becomes.
pub const MESSAGE_EVENT: &str = "chat.message";
/// Name of the event a replaying reader gets for messages trimmed before it read them.
pub const GAP_EVENT: &str = "chat.gap";

/// An inbound message, as operators see it in a `chat.message` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Its place in the inbox: rising, one sequence across accounts. `None` only where no
    /// inbox is open (a gateway built without one, in tests).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<u64>,
    /// The account's alias.
    pub account: String,
    /// The room it was sent in.
    pub room_id: String,
    /// Its sender's full ID.
    pub sender: String,
    /// Its event ID.
    pub event_id: String,
    /// Its text.
    pub body: String,
    /// The thread it belongs to, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread_root: Option<String>,
    /// Sent in a direct chat: a room marked direct (`m.direct`) or of two members at most.
    #[serde(default)]
    pub is_direct: bool,
    /// It mentions the account: `m.mentions`, its user ID or its display name.
    #[serde(default)]
    pub mentioned: bool,
}

/// Params of `chat.send`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendParams {
    /// The account's alias.
    pub account: String,
    /// The room to send to.
    pub room_id: String,
    /// The text.
    pub body: String,
    /// Send into this thread.
    #[serde(default)]
    pub thread_root: Option<String>,
    /// Makes the send idempotent: the same `txn_id` on the same account gives the same
    /// `event_id` and one message in the room, across restarts. 1 to 64 characters of
    /// `A-Z a-z 0-9 . _ ~ -`.
    #[serde(default)]
    pub txn_id: Option<String>,
    /// How `body` is read: Markdown (the default) or plain text.
    #[serde(default)]
    pub format: Format,
}

/// How the body of `chat.send` and `chat.edit` is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Markdown: rendered to HTML for clients that show it (`formatted_body`,
    /// `org.matrix.custom.html`), the text itself kept as the plain `body`.
    #[default]
    Markdown,
    /// Plain text, sent as it is.
    Plain,
}

/// Params of `chat.react`: a reaction (`m.annotation`) with `key` to `event_id`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReactParams {
    /// The account's alias.
    pub account: String,
    /// The room of the event.
    pub room_id: String,
    /// The event reacted to.
    pub event_id: String,
    /// The reaction, e.g. `👍`: 1 to [`MAX_REACTION_KEY_BYTES`] bytes.
    pub key: String,
}

/// Params of `chat.edit`: `event_id`'s text replaced by `body` (an `m.replace`), so that
/// an agent can stream a reply into one message.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditParams {
    /// The account's alias.
    pub account: String,
    /// The room of the event.
    pub room_id: String,
    /// The message replaced (one this account sent).
    pub event_id: String,
    /// Its new text.
    pub body: String,
    /// How `body` is read: Markdown (the default) or plain text.
    #[serde(default)]
    pub format: Format,
}

/// Params of `chat.typing`: the account's typing notice in a room, on or off.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypingParams {
    /// The account's alias.
    pub account: String,
    /// The room.
    pub room_id: String,
    /// Typing or not.
    pub typing: bool,
    /// How long the notice lasts unless renewed or turned off, in ms: 1 to
    /// [`MAX_TYPING_TIMEOUT_MS`]; default [`DEFAULT_TYPING_TIMEOUT_MS`].
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// The longest reaction key, in bytes.
pub const MAX_REACTION_KEY_BYTES: usize = 64;

/// The longest typing notice asked for, in ms.
pub const MAX_TYPING_TIMEOUT_MS: u64 = 120_000;

/// A typing notice's duration when the call names none, in ms.
pub const DEFAULT_TYPING_TIMEOUT_MS: u64 = 30_000;

/// What an agent does in a room besides sending: `chat.react`, `chat.edit`, `chat.typing`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatAction {
    /// `chat.react`.
    React(ReactParams),
    /// `chat.edit`.
    Edit(EditParams),
    /// `chat.typing`.
    Typing(TypingParams),
}

impl ChatAction {
    /// The action of `method` with `params`, checked; `None` for another method.
    pub fn parse(method: &str, params: serde_json::Value) -> Option<Result<Self, ChatError>> {
        let bad = |e: serde_json::Error| ChatError::BadRequest(format!("bad {method} params: {e}"));
        let action = match method {
            "chat.react" => serde_json::from_value(params).map(ChatAction::React),
            "chat.edit" => serde_json::from_value(params).map(ChatAction::Edit),
            "chat.typing" => serde_json::from_value(params).map(ChatAction::Typing),
            _ => return None,
        };
        Some(action.map_err(bad).and_then(ChatAction::checked))
    }

    /// The room it acts in.
    pub fn room_id(&self) -> &str {
        match self {
            ChatAction::React(p) => &p.room_id,
            ChatAction::Edit(p) => &p.room_id,
            ChatAction::Typing(p) => &p.room_id,
        }
    }

    /// The account it acts through.
    pub fn account(&self) -> &str {
        match self {
            ChatAction::React(p) => &p.account,
            ChatAction::Edit(p) => &p.account,
            ChatAction::Typing(p) => &p.account,
        }
    }

    fn checked(self) -> Result<Self, ChatError> {
        let bad = |m: String| Err(ChatError::BadRequest(m));
        match &self {
            ChatAction::React(p) if p.key.is_empty() || p.key.len() > MAX_REACTION_KEY_BYTES => {
                return bad(format!(
                    "field `key`: {} bytes; a reaction key is 1 to {MAX_REACTION_KEY_BYTES} bytes",
                    p.key.len()
                ));
            }
            ChatAction::Typing(TypingParams {
                timeout_ms: Some(ms),
                ..
            }) if *ms == 0 || *ms > MAX_TYPING_TIMEOUT_MS => {
                return bad(format!(
                    "field `timeout_ms`: {ms}; a typing notice lasts 1 to {MAX_TYPING_TIMEOUT_MS} ms"
                ));
            }
            _ => {}
        }
        Ok(self)
    }
}

/// Why a send failed; each has its wire error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatError {
    /// No account has this alias.
    UnknownAccount(String),
    /// The account exists but has not synced yet (starting, backing off or parked).
    NotReady(String),
    /// The account may not send there (not joined, not in `allowed_rooms`, or refused by
    /// the server).
    Forbidden(String),
    /// The request itself is wrong (e.g. a malformed room ID).
    BadRequest(String),
    /// The server could not be reached or failed.
    Failed(String),
    /// A send with the same `txn_id` is in progress.
    Busy(String),
    /// The homeserver kept answering 429 past `matrix.send_retry_within_ms`.
    RateLimited(String),
}

impl ChatError {
    /// The wire error code.
    pub fn code(&self) -> &'static str {
        match self {
            ChatError::UnknownAccount(_) => code::UNKNOWN_ACCOUNT,
            ChatError::NotReady(_) => code::ACCOUNT_NOT_READY,
            ChatError::Forbidden(_) => code::FORBIDDEN,
            ChatError::BadRequest(_) => code::BAD_REQUEST,
            ChatError::Failed(_) => code::SEND_FAILED,
            ChatError::Busy(_) => code::BUSY,
            ChatError::RateLimited(_) => code::RATE_LIMITED,
        }
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        match self {
            ChatError::UnknownAccount(m)
            | ChatError::NotReady(m)
            | ChatError::Forbidden(m)
            | ChatError::BadRequest(m)
            | ChatError::Failed(m)
            | ChatError::Busy(m)
            | ChatError::RateLimited(m) => m,
        }
    }
}

impl fmt::Display for ChatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code(), self.message())
    }
}

/// A boxed send future: the event ID of the sent message.
pub type SendFuture = Pin<Box<dyn Future<Output = Result<String, ChatError>> + Send>>;

/// A boxed action future: the event ID the action made, if it made one (a typing notice
/// makes none).
pub type ActFuture = Pin<Box<dyn Future<Output = Result<Option<String>, ChatError>> + Send>>;

/// One chat account, as the gateway sees it.
pub trait ChatAccount: Send + Sync {
    /// Sends `params.body` to `params.room_id`.
    fn send(&self, params: SendParams) -> SendFuture;

    /// Reacts, edits or sends a typing notice.
    fn act(&self, action: ChatAction) -> ActFuture;

    /// Whether the account is ready now (logged in and synced): the approvals broker
    /// notifies approvers through ready accounts.
    fn is_ready(&self) -> bool;
}

/// The accounts, and where their inbound messages go. Cheap to clone.
#[derive(Clone)]
pub struct Chat(Arc<Inner>);

struct Inner {
    hub: Hub,
    accounts: RwLock<BTreeMap<String, Arc<dyn ChatAccount>>>,
    /// Where inbound messages are stored and `txn_id`s remembered; set once at start.
    inbox: OnceLock<Inbox>,
    /// `(account, txn_id)` of the idempotent sends in progress.
    sending: Mutex<std::collections::HashSet<(String, String)>>,
}

impl fmt::Debug for Chat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let accounts = self.0.accounts.read().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("Chat")
            .field("accounts", &accounts.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Chat {
    /// Channels whose messages are published on `hub`.
    pub(crate) fn new(hub: Hub) -> Self {
        Self(Arc::new(Inner {
            hub,
            accounts: RwLock::new(BTreeMap::new()),
            inbox: OnceLock::new(),
            sending: Mutex::new(std::collections::HashSet::new()),
        }))
    }

    /// Sets the inbox (once; a second one is handed back).
    pub fn set_inbox(&self, inbox: Inbox) -> Result<(), Inbox> {
        self.0.inbox.set(inbox)
    }

    /// The inbox, once set.
    pub fn inbox(&self) -> Option<&Inbox> {
        self.0.inbox.get()
    }

    /// The sync position stored for `account` (none without an inbox).
    pub async fn position(&self, account: &str) -> Result<Option<String>, InboxError> {
        match self.inbox() {
            Some(inbox) => inbox.position(account).await,
            None => Ok(None),
        }
    }

    /// Drops `account`'s sync position (one the homeserver refused).
    pub async fn forget_position(&self, account: &str) -> Result<(), InboxError> {
        match self.inbox() {
            Some(inbox) => inbox.forget_position(account).await,
            None => Ok(()),
        }
    }

    /// Stores `messages` of `account` with its new sync position `token` (when given), then hands them
    /// to every operator subscribed to `chat.message`. Without an inbox (a gateway built
    /// in a test) they are only handed on, and the position is not kept.
    pub async fn commit(
        &self,
        account: &str,
        messages: Vec<NewMessage>,
        token: Option<String>,
    ) -> Result<(), InboxError> {
        match self.inbox() {
            Some(inbox) => inbox.commit(account, messages, token).await.map(drop),
            None => {
                for m in messages {
                    self.deliver(&m.into_chat(None));
                }
                Ok(())
            }
        }
    }

    /// Registers (or replaces) the account `alias`.
    pub fn register(&self, alias: &str, account: Arc<dyn ChatAccount>) {
        let mut accounts = self.0.accounts.write().unwrap_or_else(|e| e.into_inner());
        accounts.insert(alias.to_string(), account);
    }

    /// Forgets the account `alias` (a reload removed it): `chat.send` to it then answers
    /// `unknown_account`.
    pub fn unregister(&self, alias: &str) {
        let mut accounts = self.0.accounts.write().unwrap_or_else(|e| e.into_inner());
        accounts.remove(alias);
    }

    /// Whether account `alias` is registered and ready.
    pub fn is_ready(&self, alias: &str) -> bool {
        let accounts = self.0.accounts.read().unwrap_or_else(|e| e.into_inner());
        accounts.get(alias).is_some_and(|a| a.is_ready())
    }

    /// Hands an inbound message to every operator subscribed to `chat.message`.
    pub fn deliver(&self, message: &ChatMessage) {
        self.0.hub.publish(MESSAGE_EVENT, json!(message));
    }

    /// Sends through the account `params.account`. With a `txn_id`, a send recorded
    /// before answers its event ID without sending again; a new one is recorded once the
    /// homeserver took it (which, given the same transaction ID, does not post twice
    /// either).
    pub async fn send(&self, params: SendParams) -> Result<String, ChatError> {
        let Some(txn_id) = params.txn_id.clone() else {
            return self.send_once(params).await;
        };
        check_name("txn_id", &txn_id, &['~']).map_err(|e| ChatError::BadRequest(e.to_string()))?;
        let key = (params.account.clone(), txn_id.clone());
        let Some(_in_progress) = InProgress::take(&self.0, key) else {
            return Err(ChatError::Busy(format!(
                "a chat.send with txn_id {txn_id:?} on account {:?} is in progress",
                params.account
            )));
        };
        self.send_idempotent(params, &txn_id).await
    }

    async fn send_idempotent(&self, params: SendParams, txn_id: &str) -> Result<String, ChatError> {
        let inbox_failed = |e: InboxError| match e {
            InboxError::Busy => ChatError::Busy(e.to_string()),
            e => ChatError::Failed(format!("the inbox failed: {e}")),
        };
        let Some(inbox) = self.inbox().cloned() else {
            return self.send_once(params).await;
        };
        if let Some(event_id) = inbox
            .sent(&params.account, txn_id)
            .await
            .map_err(inbox_failed)?
        {
            return Ok(event_id);
        }
        let (account, room_id) = (params.account.clone(), params.room_id.clone());
        let event_id = self.send_once(params).await?;
        // The message is posted: a failure to record it must not report a failed send. A
        // repeat then reaches the homeserver, which keeps one event per transaction ID.
        match inbox
            .record_send(&account, txn_id, &room_id, &event_id)
            .await
        {
            Ok(recorded) => Ok(recorded),
            Err(e) => {
                tracing::warn!(account, error = %e, "A chat.send was posted but could not be recorded in the inbox.");
                Ok(event_id)
            }
        }
    }

    /// Reacts, edits or sends a typing notice through the action's account.
    pub async fn act(&self, action: ChatAction) -> Result<Option<String>, ChatError> {
        let account = {
            let accounts = self.0.accounts.read().unwrap_or_else(|e| e.into_inner());
            accounts.get(action.account()).cloned()
        };
        let Some(account) = account else {
            return Err(ChatError::UnknownAccount(format!(
                "no account {:?} is configured",
                action.account()
            )));
        };
        account.act(action).await
    }

    async fn send_once(&self, params: SendParams) -> Result<String, ChatError> {
        let account = {
            let accounts = self.0.accounts.read().unwrap_or_else(|e| e.into_inner());
            accounts.get(&params.account).cloned()
        };
        let Some(account) = account else {
            return Err(ChatError::UnknownAccount(format!(
                "no account {:?} is configured",
                params.account
            )));
        };
        account.send(params).await
    }
}

/// An idempotent send in progress: its `(account, txn_id)` is free again when this drops,
/// however the send ends (its caller may drop it halfway).
struct InProgress<'a> {
    inner: &'a Inner,
    key: (String, String),
}

impl<'a> InProgress<'a> {
    fn take(inner: &'a Inner, key: (String, String)) -> Option<Self> {
        let mut sending = inner.sending.lock().unwrap_or_else(|e| e.into_inner());
        sending.insert(key.clone()).then_some(Self { inner, key })
    }
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        let mut sending = self.inner.sending.lock().unwrap_or_else(|e| e.into_inner());
        sending.remove(&self.key);
    }
}
