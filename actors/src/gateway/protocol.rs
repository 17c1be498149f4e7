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
//! Only this module (with the rest of `gateway/`) knows the wire format; the client helper
//! in [`super::client`] is how everything else speaks it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

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
    /// Starting up: try again after the `retry_after_ms` given in the reason.
    pub const TRY_AGAIN: u16 = 1013;
    /// (Client side) no frame from the server for two tick intervals.
    pub const NO_TICK: u16 = 4000;
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
    /// Its unique name; a second connection under the same name replaces the first.
    pub name: String,
    /// The commands it runs.
    pub commands: Vec<String>,
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
pub struct NodeInvokeParams {
    /// One of the commands the node declared.
    pub command: String,
    /// The operator's arguments, as they are.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub args: Value,
}

/// One entry of `nodes.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeListing {
    /// Its name.
    pub name: String,
    /// The commands it declared (at its last connect).
    pub commands: Vec<String>,
    /// Whether it is connected now.
    pub connected: bool,
    /// When its current connection completed `connect`, ms since the Unix epoch; absent
    /// while it is offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_at: Option<u64>,
    /// When the gateway last received a frame from it, ms since the Unix epoch.
    pub last_seen: u64,
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
