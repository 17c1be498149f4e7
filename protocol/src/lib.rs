//! The gateway wire protocol, v1: JSON text frames over WebSocket.
//!
//! ```text
//! server → {"type":"event","event":"connect.challenge","payload":{"nonce":"…","ts":…}}
//! client → {"type":"req","id":"1","method":"connect","params":{"protocol":1,"role":"operator",
//!           "token":"…","client":{"name":"warden-cli","version":"0.1.0"}}}
//! server → {"type":"res","id":"1","ok":true,"payload":{"type":"hello-ok",
//!           "server":{"version":"0.1.0"},"policy":{"tick_interval_ms":30000,"max_frame_bytes":1048576}}}
//! ```
//!
//! Only this crate and `warden-actors`' `gateway/` know the wire format; the client helper
//! `gateway::client` is how everything else speaks it.
//!
//! * [`auth`] — principals and credentials: who may connect, as what.
//! * [`handshake`] — the pure check of the frame that authenticates a socket.
//! * [`grant`] — the single-use approval grants a node checks before running a command
//!   that needs approval.

pub mod auth;
pub mod grant;
pub mod handshake;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Bytes of lower- or upper-case hex; `None` if it is not hex of whole bytes.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The protocol version a `connect` must name.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame accepted before `hello-ok` (64 KiB).
pub const MAX_PREAUTH_FRAME_BYTES: usize = 64 * 1024;

/// WebSocket close codes the gateway uses, and what a client should do about each.
pub mod close {
    /// Normal closure (a client leaving).
    pub const NORMAL: u16 = 1000;
    /// The server is stopping for good: do not reconnect until it is back.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame that is not valid JSON of the protocol.
    pub const INVALID_FRAME: u16 = 1007;
    /// Authentication or policy failure: reconnecting with the same token will not help.
    pub const POLICY: u16 = 1008;
    /// A frame larger than allowed.
    pub const TOO_BIG: u16 = 1009;
    /// Service restart: reconnect (after the `expected_back_ms` of the `shutdown` event).
    pub const RESTART: u16 = 1012;
    /// The server failed (e.g. a replay could not read the inbox): reconnect and resume.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// Starting up: try again after the `retry_after_ms` given in the reason.
    pub const TRY_AGAIN: u16 = 1013;
    /// (Client side) no frame from the server for two tick intervals.
    pub const NO_TICK: u16 = 4000;
    /// The session fell behind the event stream (more events waiting for it than the hub
    /// keeps) and would have lost some: reconnect and resubscribe, then catch up on state
    /// with the list methods (`approvals.list`, `nodes.list`).
    pub const SLOW_CONSUMER: u16 = 4001;
    /// The handshake did not complete in time.
    pub const HANDSHAKE_TIMEOUT: u16 = 4408;
}

/// Error codes of `res` frames.
pub mod code {
    /// The token was wrong (the socket is then closed with 1008).
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// A malformed request: bad params, wrong protocol version, `connect` twice.
    pub const BAD_REQUEST: &str = "bad_request";
    /// No such method.
    pub const UNKNOWN_METHOD: &str = "unknown_method";
    /// The method is not allowed for this session's role.
    pub const FORBIDDEN: &str = "forbidden";
    /// The method exists but is not available in this version.
    pub const NOT_IMPLEMENTED: &str = "not_implemented";
    /// Something failed inside the gateway.
    pub const INTERNAL: &str = "internal";
    /// `nodes.invoke`: no node of that name has ever connected.
    pub const UNKNOWN_NODE: &str = "unknown_node";
    /// `nodes.invoke`: the node connected before but is not connected now.
    pub const NODE_OFFLINE: &str = "node_offline";
    /// `nodes.invoke`: the node did not declare that command.
    pub const UNKNOWN_COMMAND: &str = "unknown_command";
    /// `nodes.invoke`: the node did not answer within `timeout_ms`.
    pub const TIMEOUT: &str = "timeout";
    /// `chat.send`: no account has that alias.
    pub const UNKNOWN_ACCOUNT: &str = "unknown_account";
    /// `chat.send`: the account has not finished its first sync (starting, backing off or
    /// parked).
    pub const ACCOUNT_NOT_READY: &str = "account_not_ready";
    /// `chat.send`: the homeserver could not be reached or failed the send.
    pub const SEND_FAILED: &str = "send_failed";
    /// `chat.send`, `chat.react`, `chat.edit`, `chat.typing`: the homeserver kept
    /// rate-limiting the send past `matrix.send_retry_within_ms`; the message names it.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// `approvals.resolve`: the approval was already decided (first decision wins).
    pub const ALREADY_RESOLVED: &str = "already_resolved";
    /// `approvals.resolve`: no approval has that id.
    pub const UNKNOWN_APPROVAL: &str = "unknown_approval";
    /// `nodes.invoke`: the command needs an approval; ask with `approvals.request`.
    pub const APPROVAL_REQUIRED: &str = "approval_required";
    /// A per-client or per-node cap is reached (open invocations, open approvals, queued
    /// commands); the message names the cap. Try again later.
    pub const BUSY: &str = "busy";
    /// A value is over its size or count limit; the message names the limit.
    pub const TOO_LARGE: &str = "too_large";
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Frame {
    /// A request; answered by a `res` with the same id.
    Req {
        /// Chosen by the sender, unique among its open requests.
        id: String,
        /// The method.
        method: String,
        /// Its parameters (an object, or absent).
        #[serde(default, skip_serializing_if = "Value::is_null")]
        params: Value,
    },
    /// The answer to a request.
    Res {
        /// The request's id.
        id: String,
        /// Whether it succeeded.
        ok: bool,
        /// The result, when `ok`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        payload: Option<Value>,
        /// The error, when not `ok`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<ErrorBody>,
    },
    /// Something that happened.
    Event {
        /// Its name (`tick`, `shutdown`, `node.connected`, …).
        event: String,
        /// Its data.
        #[serde(default, skip_serializing_if = "Value::is_null")]
        payload: Value,
    },
}

/// The error of a failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable, from [`code`] (or a method's own, e.g. `unknown_node`).
    pub code: String,
    /// For people.
    pub message: String,
}

impl Frame {
    /// A successful answer.
    pub fn ok(id: impl Into<String>, payload: Value) -> Self {
        Frame::Res {
            id: id.into(),
            ok: true,
            payload: Some(payload),
            error: None,
        }
    }

    /// A failed answer.
    pub fn err(id: impl Into<String>, code: &str, message: impl Into<String>) -> Self {
        Frame::Res {
            id: id.into(),
            ok: false,
            payload: None,
            error: Some(ErrorBody {
                code: code.to_string(),
                message: message.into(),
            }),
        }
    }

    /// An event.
    pub fn event(event: impl Into<String>, payload: Value) -> Self {
        Frame::Event {
            event: event.into(),
            payload,
        }
    }

    /// The JSON text of this frame.
    pub fn to_text(&self) -> String {
        // Serializing these types cannot fail: every field is a string, bool or JSON value.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses one text frame.
    pub fn parse(text: &str) -> Result<Frame, FrameError> {
        serde_json::from_str(text).map_err(|e| FrameError(e.to_string()))
    }
}

/// A text frame that is not a frame of the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a frame of the protocol: {0}")]
pub struct FrameError(pub String);

/// Who a client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A person's tool: `warden call`, a dashboard.
    Operator,
    /// A node host that runs commands for the gateway.
    Node,
    /// An approval handler of one Matrix account.
    Approver,
}

impl Role {
    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Node => "node",
            Role::Approver => "approver",
        }
    }
}

/// The payload of `connect.challenge`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// A fresh random value per socket.
    pub nonce: String,
    /// Server time, ms since the Unix epoch.
    pub ts: u64,
}

/// The params of `connect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectParams {
    /// Must be [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// Who connects.
    pub role: Role,
    /// The gateway token.
    pub token: String,
    /// The client program.
    pub client: ClientInfo,
    /// For role `node`: its name and commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeInfo>,
    /// For role `approver`: the Matrix account alias it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
}

/// The client program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    /// e.g. `warden-cli`, `warden-node`.
    pub name: String,
    /// Its version.
    pub version: String,
}

/// What a node offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its unique name; only its own credential can replace a live connection of it.
    pub name: String,
    /// The commands it runs.
    pub commands: Vec<CommandInfo>,
}

/// One command a node offers. On the wire `{"name", "approval"}`; a bare string is a
/// command that needs no approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "CommandInfoWire")]
pub struct CommandInfo {
    /// Its name.
    pub name: String,
    /// Whether each run needs an approval (`[node.commands.<name>].approval`): the gateway
    /// refuses it to `nodes.invoke` and the node runs it only with a grant.
    #[serde(default)]
    pub approval: bool,
}

impl CommandInfo {
    /// A command that needs no approval.
    pub fn plain(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            approval: false,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum CommandInfoWire {
    Name(String),
    Full {
        name: String,
        #[serde(default)]
        approval: bool,
    },
}

impl From<&str> for CommandInfo {
    fn from(name: &str) -> Self {
        Self::plain(name)
    }
}

impl From<CommandInfoWire> for CommandInfo {
    fn from(wire: CommandInfoWire) -> Self {
        match wire {
            CommandInfoWire::Name(name) => Self::plain(name),
            CommandInfoWire::Full { name, approval } => Self { name, approval },
        }
    }
}

/// The payload of a successful `connect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloOk {
    /// Always `hello-ok`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The server.
    pub server: ServerInfo,
    /// What the client must respect.
    pub policy: SessionPolicy,
}

/// The server program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Its version.
    pub version: String,
}

/// What a session must respect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionPolicy {
    /// The server sends `tick` this often; two missed ticks mean the connection is dead.
    pub tick_interval_ms: u64,
    /// Largest frame the server accepts.
    pub max_frame_bytes: usize,
}

/// The payload of the `shutdown` event, sent before the server closes every socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownNotice {
    /// True when the server is restarting (close 1012), false when stopping (1001).
    pub restart: bool,
    /// When to expect it back.
    pub expected_back_ms: u64,
}

/// The params of `subscribe`: the event names to forward to this session from now on
/// (added to those subscribed before).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeParams {
    /// Event names, e.g. `node.connected`.
    pub events: Vec<String>,
    /// With `chat.message`: replay stored messages after this cursor (a number), or from
    /// the oldest kept (`"earliest"`), before going live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Value>,
    /// With `chat.message`: a durable consumer; the replay starts after its last
    /// `chat.ack` (or at `since`, or the oldest kept, when it is new).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
}

/// The params of `chat.ack` (from an operator): consumer `consumer` has handled every
/// message up to `cursor`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckParams {
    /// The durable consumer.
    pub consumer: String,
    /// The cursor of the last message it handled.
    pub cursor: u64,
}

/// The params of `nodes.invoke` (from an operator).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvokeParams {
    /// The node's name.
    pub node: String,
    /// One of the commands it declared.
    pub command: String,
    /// Passed on to the node as they are.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub args: Value,
    /// How long to wait for the node's answer; default [`DEFAULT_INVOKE_TIMEOUT_MS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// How long `nodes.invoke` waits for the node by default.
pub const DEFAULT_INVOKE_TIMEOUT_MS: u64 = 60_000;

/// The params of `node.invoke`, the request the gateway sends a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeInvokeParams {
    /// One of the commands the node declared.
    pub command: String,
    /// The operator's arguments, as they are.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub args: Value,
    /// For a command that needs approval: the broker's single-use grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<grant::Grant>,
}

/// One entry of `nodes.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeListing {
    /// Its name.
    pub name: String,
    /// The commands it declared (at its last connect).
    pub commands: Vec<String>,
    /// Those of its commands that need an approval for each run.
    #[serde(default)]
    pub approval_required: Vec<String>,
    /// Whether it is connected now.
    pub connected: bool,
    /// When its current connection completed `connect`, ms since the Unix epoch; absent
    /// while it is offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_at: Option<u64>,
    /// When the gateway last received a frame from it, ms since the Unix epoch.
    pub last_seen: u64,
}

/// Bounds of `approvals.request`'s `timeout_s`: one second to one day.
pub const APPROVAL_TIMEOUT_S: std::ops::RangeInclusive<u64> = 1..=86_400;

/// The params of `approvals.request` (from an operator).
#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalRequestParams {
    /// The node to run the command on.
    pub node: String,
    /// One of the commands it declared.
    pub command: String,
    /// Passed on to the node as they are (absent: `null`). The broker refuses more than
    /// 16 KiB of compact JSON with `too_large`.
    pub args: Value,
    /// Why, for the approvers. The broker refuses more than 4 KiB with `too_large`.
    pub reason: String,
    /// Seconds to wait for a decision, within [`APPROVAL_TIMEOUT_S`]; absent: the
    /// gateway's default (300 s).
    pub timeout_s: Option<u64>,
    /// The one account whose approval handler notifies (its approvers only); absent: each
    /// distinct approver is notified once, through one account the gateway picks.
    pub account: Option<String>,
}

impl ApprovalRequestParams {
    /// Reads the params; the error names the field at fault.
    pub fn parse(params: Value) -> Result<Self, String> {
        let mut p = Params::new(params)?;
        let node = p.string("node")?;
        let command = p.string("command")?;
        for (field, value) in [("node", &node), ("command", &command)] {
            if value.len() > handshake::MAX_NAME_LEN {
                return Err(format!(
                    "field `{field}`: longer than {} bytes",
                    handshake::MAX_NAME_LEN
                ));
            }
        }
        let args = p.take("args").unwrap_or(Value::Null);
        let reason = p.string("reason")?;
        let timeout_s = match p.take("timeout_s") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(s) if APPROVAL_TIMEOUT_S.contains(&s) => Some(s),
                _ => {
                    return Err(format!(
                        "field `timeout_s`: must be a whole number of seconds from {} to {}",
                        APPROVAL_TIMEOUT_S.start(),
                        APPROVAL_TIMEOUT_S.end()
                    ));
                }
            },
        };
        let account = p.optional_name("account")?;
        p.done()?;
        Ok(Self {
            node,
            command,
            args,
            reason,
            timeout_s,
            account,
        })
    }
}

/// An approver's verdict in `approvals.resolve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// `"approve"`: run the command.
    Approve,
    /// `"deny"`: do not.
    Deny,
}

/// The params of `approvals.resolve` (from an approver): a decision seen in a chat room.
/// It counts only when made in the room where `by` was asked (see
/// [`ApprovalNotifiedParams`]), and, when it relates to an event, only when that event is
/// the request `by` got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalResolveParams {
    /// The approval's id; absent when the decision only relates to the request's event (a
    /// reaction, or a reply without the id).
    pub id: Option<String>,
    /// `approve` or `deny`.
    pub decision: Verdict,
    /// Who decided: a Matrix user ID among the approvers of the session's account
    /// (compared case-insensitively).
    pub by: String,
    /// The room the decision was made in.
    pub room_id: String,
    /// The decision's own event (the reply or the reaction).
    pub event_id: String,
    /// The event the decision relates to: the one reacted to, or replied to.
    pub relates_to: Option<String>,
}

/// Longest room or event ID `approvals.resolve` and `approvals.notified` take, in bytes
/// (the Matrix limit on identifiers).
pub const MAX_MATRIX_ID_LEN: usize = 255;

/// The params of `approvals.notified` (from an approver): the handler told `approver` about
/// approval `id` with event `event_id` in room `room_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalNotifiedParams {
    /// The approval's id.
    pub id: String,
    /// The approver told.
    pub approver: String,
    /// The room of the message (the direct message with the approver).
    pub room_id: String,
    /// The message.
    pub event_id: String,
}

impl ApprovalNotifiedParams {
    /// Reads the params; the error names the field at fault.
    pub fn parse(params: Value) -> Result<Self, String> {
        let mut p = Params::new(params)?;
        let id = p.string("id")?;
        let approver = p.matrix_id("approver")?;
        let room_id = p.matrix_id("room_id")?;
        let event_id = p.matrix_id("event_id")?;
        p.done()?;
        Ok(Self {
            id,
            approver,
            room_id,
            event_id,
        })
    }
}

impl ApprovalResolveParams {
    /// Reads the params; the error names the field at fault.
    pub fn parse(params: Value) -> Result<Self, String> {
        let mut p = Params::new(params)?;
        let id = match p.take("id") {
            None | Some(Value::Null) => None,
            Some(Value::String(id)) if !id.trim().is_empty() => Some(id),
            Some(_) => return Err("field `id`: must be a non-empty string".to_string()),
        };
        let decision = match p.string("decision")?.as_str() {
            "approve" => Verdict::Approve,
            "deny" => Verdict::Deny,
            other => {
                return Err(format!(
                    "field `decision`: expected \"approve\" or \"deny\", got {other:?}"
                ));
            }
        };
        let by = p.matrix_id("by")?;
        let room_id = p.matrix_id("room_id")?;
        let event_id = p.matrix_id("event_id")?;
        let relates_to = match p.take("relates_to") {
            None | Some(Value::Null) => None,
            Some(v) => {
                p.0.insert("relates_to".to_string(), v);
                Some(p.matrix_id("relates_to")?)
            }
        };
        p.done()?;
        if id.is_none() && relates_to.is_none() {
            return Err(
                "field `id`: missing (needed unless `relates_to` names the request's event)"
                    .to_string(),
            );
        }
        Ok(Self {
            id,
            decision,
            by,
            room_id,
            event_id,
            relates_to,
        })
    }
}

/// Bounds of `approvals.list`'s `limit`.
pub const APPROVALS_LIST_LIMIT: std::ops::RangeInclusive<usize> = 1..=200;

/// `approvals.list`'s `limit` when the params have none.
pub const DEFAULT_APPROVALS_LIST_LIMIT: usize = 50;

/// The params of `approvals.list` (`{limit?, cursor?}`, both optional).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalsListParams {
    /// Most entries in the page, within [`APPROVALS_LIST_LIMIT`]; absent:
    /// [`DEFAULT_APPROVALS_LIST_LIMIT`].
    pub limit: usize,
    /// Start just after this entry (the `next` of the previous page); absent: from the
    /// first entry.
    pub cursor: Option<ApprovalCursor>,
}

impl Default for ApprovalsListParams {
    fn default() -> Self {
        Self {
            limit: DEFAULT_APPROVALS_LIST_LIMIT,
            cursor: None,
        }
    }
}

/// Reads the params of `approvals.list`; the error names the field at fault.
pub fn parse_approvals_list(params: Value) -> Result<ApprovalsListParams, String> {
    let mut p = Params::new(params)?;
    let limit = match p.take("limit") {
        None | Some(Value::Null) => DEFAULT_APPROVALS_LIST_LIMIT,
        Some(v) => match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
            Some(n) if APPROVALS_LIST_LIMIT.contains(&n) => n,
            _ => {
                return Err(format!(
                    "field `limit`: must be a whole number from {} to {}",
                    APPROVALS_LIST_LIMIT.start(),
                    APPROVALS_LIST_LIMIT.end()
                ));
            }
        },
    };
    let cursor = match p.take("cursor") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            s.parse::<ApprovalCursor>()
                .map_err(|e| format!("field `cursor`: {e}"))?,
        ),
        Some(other) => {
            return Err(format!(
                "field `cursor`: expected a string, got {}",
                json_kind(&other)
            ));
        }
    };
    p.done()?;
    Ok(ApprovalsListParams { limit, cursor })
}

/// The two parts of `approvals.list`, in the order they are listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListSection {
    /// Pending, or approved with the command running: oldest request first.
    Open,
    /// Over: most recently decided first.
    Resolved,
}

/// A position in `approvals.list`: the entry a page ended with. On the wire it is a string,
/// `o<requested_at_ms>-<id>` for an open approval or `r<decided_at_ms>-<id>` for a resolved
/// one — the sort key of that entry, so a cursor stays valid whatever happens to the
/// entries around it (or to that entry) between pages.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct ApprovalCursor {
    /// The part of the listing.
    pub section: ListSection,
    /// `requested_at_ms` (open) or `decided_at_ms` (resolved) of the entry.
    pub at_ms: u64,
    /// The entry's id.
    pub id: String,
}

impl std::fmt::Display for ApprovalCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let section = match self.section {
            ListSection::Open => 'o',
            ListSection::Resolved => 'r',
        };
        write!(f, "{section}{}-{}", self.at_ms, self.id)
    }
}

impl std::str::FromStr for ApprovalCursor {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not the `next` of an approvals.list page");
        let section = match s.as_bytes().first() {
            Some(b'o') => ListSection::Open,
            Some(b'r') => ListSection::Resolved,
            _ => return Err(bad()),
        };
        let (at_ms, id) = s[1..].split_once('-').ok_or_else(bad)?;
        let id_ok = (1..=32).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let digits_ok = !at_ms.is_empty() && at_ms.bytes().all(|b| b.is_ascii_digit());
        match at_ms.parse() {
            Ok(at_ms) if id_ok && digits_ok => Ok(Self {
                section,
                at_ms,
                id: id.to_string(),
            }),
            _ => Err(bad()),
        }
    }
}

impl From<ApprovalCursor> for String {
    fn from(cursor: ApprovalCursor) -> String {
        cursor.to_string()
    }
}

impl TryFrom<String> for ApprovalCursor {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// The answer to `approvals.list`: one page of entries, open approvals first (oldest
/// request first), then resolved ones (most recently decided first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalPage {
    /// At most the `limit` asked for.
    pub approvals: Vec<ApprovalListing>,
    /// Present when more entries follow: pass it as `cursor` to get the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<ApprovalCursor>,
}

/// How an approval was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// The command runs (or ran).
    Approved,
    /// Denied by an approver, or by `timeout`.
    Denied,
}

impl Decision {
    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Approved => "approved",
            Decision::Denied => "denied",
        }
    }
}

/// The payload of event `approval.requested`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRequested {
    /// 8 lowercase letters and digits.
    pub id: String,
    /// The node.
    pub node: String,
    /// The command.
    pub command: String,
    /// Its arguments.
    pub args: Value,
    /// Why.
    pub reason: String,
    /// When it is denied by `timeout` without a decision, ms since the Unix epoch.
    pub expires_at_ms: u64,
    /// Whom to notify, through which account: one entry per approver. An approval handler
    /// notifies the entries of its own account only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<NoticeTarget>,
}

/// One approver to notify, through one account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoticeTarget {
    /// The approver's Matrix ID, as configured.
    pub approver: String,
    /// The account whose approval handler notifies.
    pub account: String,
}

/// One notification of an approval, in `approvals.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalNotice {
    /// The approver.
    pub approver: String,
    /// The account that notifies (or notified).
    pub account: String,
    /// Whether this is the approver's current notice; false once the gateway re-sent the
    /// approval through another account.
    pub active: bool,
    /// Once delivered: the room of the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room_id: Option<String>,
    /// Once delivered: the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// Once delivered: when, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at_ms: Option<u64>,
}

/// Where a decision was made: the account that saw it, its room and its event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecidedVia {
    /// The account whose approval handler passed the decision on.
    pub account: String,
    /// The room.
    pub room_id: String,
    /// The decision's event (a reply or a reaction).
    pub event_id: String,
}

/// How an approval ended: the payload of event `approval.resolved` and the answer to the
/// requester's `approvals.request`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalOutcome {
    /// The approval's id.
    pub id: String,
    /// Approved or denied.
    pub decision: Decision,
    /// The approver, or `timeout`.
    pub by: String,
    /// Approved and the node answered: its `nodes.invoke` payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Approved but the command could not run or failed (`node_offline`, `timeout`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// Decided by an approver: where.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<DecidedVia>,
}

/// The answer to `approvals.resolve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalResolved {
    /// The approval's id.
    pub id: String,
    /// The decision taken.
    pub decision: Decision,
}

/// One entry of `approvals.list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalListing {
    /// The approval's id.
    pub id: String,
    /// The node.
    pub node: String,
    /// The command.
    pub command: String,
    /// Its arguments.
    pub args: Value,
    /// Why.
    pub reason: String,
    /// When it was requested, ms since the Unix epoch.
    pub requested_at_ms: u64,
    /// When it is (or was) denied without a decision, ms since the Unix epoch.
    pub expires_at_ms: u64,
    /// False while pending, or approved with its command still running; true once over.
    pub resolved: bool,
    /// The decision, once taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// Who took it (`timeout` when nobody did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// When it was taken, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at_ms: Option<u64>,
    /// Decided by an approver: where.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<DecidedVia>,
    /// The request's notifications (absent once it is over).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notices: Vec<ApprovalNotice>,
}

/// Reads an object of params field by field, so that every error names its field.
struct Params(serde_json::Map<String, Value>);

impl Params {
    /// The params object; absent params are an empty object.
    fn new(params: Value) -> Result<Self, String> {
        match params {
            Value::Null => Ok(Self(serde_json::Map::new())),
            Value::Object(map) => Ok(Self(map)),
            other => Err(format!(
                "params must be an object, not {}",
                json_kind(&other)
            )),
        }
    }

    fn take(&mut self, field: &str) -> Option<Value> {
        self.0.remove(field)
    }

    /// A required, non-empty string.
    fn string(&mut self, field: &str) -> Result<String, String> {
        match self.take(field) {
            None | Some(Value::Null) => Err(format!("field `{field}`: missing")),
            Some(Value::String(s)) if s.trim().is_empty() => {
                Err(format!("field `{field}`: must not be empty"))
            }
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(format!(
                "field `{field}`: expected a string, got {}",
                json_kind(&other)
            )),
        }
    }

    /// A required Matrix identifier (user, room or event ID): a string of at most
    /// [`MAX_MATRIX_ID_LEN`] bytes with no white space or control characters.
    fn matrix_id(&mut self, field: &str) -> Result<String, String> {
        let id = self.string(field)?;
        if id.len() > MAX_MATRIX_ID_LEN {
            return Err(format!(
                "field `{field}`: longer than {MAX_MATRIX_ID_LEN} bytes"
            ));
        }
        if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("field `{field}`: must not contain white space"));
        }
        Ok(id)
    }

    /// An optional name (an account alias): at most [`handshake::MAX_NAME_LEN`] bytes.
    fn optional_name(&mut self, field: &str) -> Result<Option<String>, String> {
        match self.take(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                self.0.insert(field.to_string(), v);
                let name = self.string(field)?;
                if name.len() > handshake::MAX_NAME_LEN {
                    return Err(format!(
                        "field `{field}`: longer than {} bytes",
                        handshake::MAX_NAME_LEN
                    ));
                }
                Ok(Some(name))
            }
        }
    }

    /// Fails on the first field left unread.
    fn done(self) -> Result<(), String> {
        match self.0.keys().next() {
            Some(field) => Err(format!("field `{field}`: unknown")),
            None => Ok(()),
        }
    }
}

pub(crate) fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The reason text of a 1013 close: `starting; retry_after_ms=<n>`.
pub fn try_again_reason(retry_after_ms: u64) -> String {
    format!("starting; retry_after_ms={retry_after_ms}")
}

/// Reads `retry_after_ms` back from a 1013 close reason.
pub fn parse_retry_after(reason: &str) -> Option<u64> {
    reason
        .split(';')
        .find_map(|part| part.trim().strip_prefix("retry_after_ms=")?.parse().ok())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn frames_round_trip_in_the_documented_shape() {
        let req = Frame::parse(r#"{"type":"req","id":"1","method":"health"}"#).expect("req");
        assert_eq!(
            req,
            Frame::Req {
                id: "1".into(),
                method: "health".into(),
                params: Value::Null
            }
        );
        let ok = Frame::ok("1", json!({"status": "ok"}));
        assert_eq!(
            ok.to_text(),
            r#"{"type":"res","id":"1","ok":true,"payload":{"status":"ok"}}"#
        );
        let err = Frame::err("2", code::UNKNOWN_METHOD, "no method frob");
        assert_eq!(
            err.to_text(),
            r#"{"type":"res","id":"2","ok":false,"error":{"code":"unknown_method","message":"no method frob"}}"#
        );
        let ev = Frame::event("tick", json!({"ts": 5}));
        assert_eq!(Frame::parse(&ev.to_text()), Ok(ev));
    }

    #[test]
    fn numbers_survive_a_relay() {
        // Found by the `frame` fuzz target: without serde_json's `float_roundtrip`, a
        // number parsed, written and parsed again could come back one ULP off, so a
        // relayed frame changed its arguments.
        for number in [
            "222222222222222222222222",
            "2.2222222222222222e+23",
            "0.1",
            "-1e-300",
        ] {
            let text = format!(r#"{{"type":"req","id":"1","method":"m","params":[{number}]}}"#);
            let frame = Frame::parse(&text).expect("frame");
            assert_eq!(Frame::parse(&frame.to_text()), Ok(frame), "{number}");
        }
    }

    #[test]
    fn bad_frames_are_errors() {
        for bad in [
            "not json",
            r#"{"type":"frob"}"#,
            r#"{"type":"req","id":"1"}"#,
            r#"{"type":"req","id":"1","method":"x","extra":1}"#,
            r#"[1,2]"#,
        ] {
            assert!(Frame::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn approval_params_name_the_field_at_fault() {
        let ok = ApprovalRequestParams::parse(json!({
            "node": "box", "command": "disk", "args": ["-h"], "reason": "full?", "timeout_s": 60
        }))
        .expect("valid");
        assert_eq!((ok.node.as_str(), ok.timeout_s), ("box", Some(60)));
        let bad = |v: Value| ApprovalRequestParams::parse(v).expect_err("invalid");
        assert!(bad(json!({"command": "x", "reason": "r"})).contains("`node`"));
        assert!(bad(json!({"node": "", "command": "x", "reason": "r"})).contains("`node`"));
        assert!(bad(json!({"node": "n", "command": 5, "reason": "r"})).contains("`command`"));
        assert!(bad(json!({"node": "n", "command": "x"})).contains("`reason`"));
        for t in [json!(0), json!(86_401), json!(-1), json!(1.5), json!("5")] {
            let v = json!({"node": "n", "command": "x", "reason": "r", "timeout_s": t});
            assert!(bad(v).contains("`timeout_s`"), "{t}");
        }
        let v = json!({"node": "n", "command": "x", "reason": "r", "frob": 1});
        assert!(bad(v).contains("`frob`"));
        assert!(bad(json!([1])).contains("object"));

        let r = ApprovalResolveParams::parse(json!({"id": "abcd1234", "decision": "deny",
            "by": "@o:x", "room_id": "!r:x", "event_id": "$e"}))
        .expect("valid");
        assert_eq!(r.decision, Verdict::Deny);
        assert_eq!((r.id.as_deref(), r.relates_to), (Some("abcd1234"), None));
        let reaction = ApprovalResolveParams::parse(json!({"decision": "approve", "by": "@o:x",
            "room_id": "!r:x", "event_id": "$e", "relates_to": "$req"}))
        .expect("a reaction names no id");
        assert_eq!(
            (reaction.id, reaction.relates_to.as_deref()),
            (None, Some("$req"))
        );
        let bad = |v: Value| ApprovalResolveParams::parse(v).expect_err("invalid");
        let at = |extra: Value| {
            let mut v = json!({"id": "a", "decision": "approve", "by": "@o:x",
                "room_id": "!r:x", "event_id": "$e"});
            for (k, x) in extra.as_object().expect("object") {
                if x.is_null() {
                    v.as_object_mut().expect("object").remove(k);
                } else {
                    v[k] = x.clone();
                }
            }
            v
        };
        assert!(bad(at(json!({"decision": "maybe"}))).contains("`decision`"));
        assert!(bad(at(json!({"by": null}))).contains("`by`"));
        assert!(bad(at(json!({"id": null}))).contains("`id`"));
        assert!(bad(at(json!({"room_id": null}))).contains("`room_id`"));
        assert!(bad(at(json!({"event_id": "$a b"}))).contains("`event_id`"));
        assert!(bad(at(json!({"room_id": "!".repeat(256)}))).contains("255 bytes"));
        let notified = ApprovalNotifiedParams::parse(json!({"id": "abcd1234",
            "approver": "@o:x", "room_id": "!r:x", "event_id": "$e"}))
        .expect("valid");
        assert_eq!(notified.approver, "@o:x");
        assert!(
            ApprovalNotifiedParams::parse(json!({"id": "a", "approver": "@o:x",
            "room_id": "!r:x"}))
            .expect_err("no event")
            .contains("`event_id`")
        );
        let pinned = ApprovalRequestParams::parse(json!({"node": "n", "command": "c",
            "reason": "r", "account": "nova"}))
        .expect("valid");
        assert_eq!(pinned.account.as_deref(), Some("nova"));
        assert!(
            ApprovalRequestParams::parse(json!({"node": "n", "command": "c",
            "reason": "r", "account": 7}))
            .expect_err("not a string")
            .contains("`account`")
        );
        assert_eq!(
            parse_approvals_list(Value::Null),
            Ok(ApprovalsListParams::default())
        );
        assert!(parse_approvals_list(json!({"x": 1})).is_err());
    }

    #[test]
    fn approvals_list_params_and_cursors() {
        let cursor = ApprovalCursor {
            section: ListSection::Resolved,
            at_ms: 1_700_000_000_123,
            id: "abcd1234".into(),
        };
        assert_eq!(cursor.to_string(), "r1700000000123-abcd1234");
        assert_eq!(cursor.to_string().parse(), Ok(cursor.clone()));
        assert_eq!(
            serde_json::to_value(&cursor).ok(),
            Some(json!("r1700000000123-abcd1234"))
        );
        let p =
            parse_approvals_list(json!({"limit": 200, "cursor": "o5-zz00zz00"})).expect("valid");
        assert_eq!(p.limit, 200);
        assert_eq!(
            p.cursor,
            Some(ApprovalCursor {
                section: ListSection::Open,
                at_ms: 5,
                id: "zz00zz00".into()
            })
        );
        assert_eq!(
            parse_approvals_list(json!({"limit": 1})).map(|p| p.limit),
            Ok(1)
        );
        let bad = |v: Value| parse_approvals_list(v).expect_err("invalid");
        for limit in [json!(0), json!(201), json!(-1), json!(2.5), json!("10")] {
            assert!(
                bad(json!({ "limit": limit })).contains("`limit`"),
                "{limit}"
            );
        }
        for cursor in [
            json!(""),
            json!("x5-abc"),
            json!("o-abc"),
            json!("o5"),
            json!("o5-"),
            json!("o+5-abc"),
            json!("o5-ABC"),
            json!("o5-a/b"),
            json!("o99999999999999999999-abc"),
            json!(5),
        ] {
            assert!(
                bad(json!({ "cursor": cursor })).contains("`cursor`"),
                "{cursor}"
            );
        }
        let page = ApprovalPage {
            approvals: Vec::new(),
            next: None,
        };
        assert_eq!(
            serde_json::to_value(&page).ok(),
            Some(json!({"approvals": []}))
        );
    }

    #[test]
    fn connect_params_and_retry_after() {
        let p: ConnectParams = serde_json::from_value(json!({
            "protocol": 1, "role": "node", "token": "t",
            "client": {"name": "warden-node", "version": "0.1.0"},
            "node": {"name": "build-box", "commands": ["uptime"]}
        }))
        .expect("params");
        assert_eq!(p.role, Role::Node);
        assert_eq!(p.node.map(|n| n.name), Some("build-box".to_string()));
        assert_eq!(parse_retry_after(&try_again_reason(1500)), Some(1500));
        assert_eq!(parse_retry_after("going away"), None);
    }
}
