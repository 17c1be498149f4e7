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
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::hub::Hub;
use super::protocol::code;

/// Name of the event an inbound message becomes.
pub const MESSAGE_EVENT: &str = "chat.message";

/// An inbound message, as operators see it in a `chat.message` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
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
        }
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        match self {
            ChatError::UnknownAccount(m)
            | ChatError::NotReady(m)
            | ChatError::Forbidden(m)
            | ChatError::BadRequest(m)
            | ChatError::Failed(m) => m,
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

/// One chat account, as the gateway sees it.
pub trait ChatAccount: Send + Sync {
    /// Sends `params.body` to `params.room_id`.
    fn send(&self, params: SendParams) -> SendFuture;
}

/// The accounts, and where their inbound messages go. Cheap to clone.
#[derive(Clone)]
pub struct Chat(Arc<Inner>);

struct Inner {
    hub: Hub,
    accounts: RwLock<BTreeMap<String, Arc<dyn ChatAccount>>>,
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
        }))
    }

    /// Registers (or replaces) the account `alias`.
    pub fn register(&self, alias: &str, account: Arc<dyn ChatAccount>) {
        let mut accounts = self.0.accounts.write().unwrap_or_else(|e| e.into_inner());
        accounts.insert(alias.to_string(), account);
    }

    /// Hands an inbound message to every operator subscribed to `chat.message`.
    pub fn deliver(&self, message: &ChatMessage) {
        self.0.hub.publish(MESSAGE_EVENT, json!(message));
    }

    /// Sends through the account `params.account`.
    pub async fn send(&self, params: SendParams) -> Result<String, ChatError> {
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
