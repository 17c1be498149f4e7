//! The handshake, as a pure function: what a session does with a client frame before
//! `hello-ok`. The session actor owns the socket, the timers and the pre-auth slot; this
//! decides, from the text alone and the configured [`Principals`], whether the frame
//! authenticates the socket and as whom. It is what the fuzz target drives.

use serde_json::Value;

use crate::auth::{AuthError, Principal, Principals};
use crate::{ClientInfo, ConnectParams, Frame, NodeInfo, PROTOCOL_VERSION, Role, code};

/// Longest node name, account alias or client name a `connect` may carry.
pub const MAX_NAME_LEN: usize = 128;

/// Most commands a node may declare.
pub const MAX_NODE_COMMANDS: usize = 256;

/// A `connect` that authenticated.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// The request id, for `hello-ok`.
    pub id: String,
    /// Who it is, as the server decided.
    pub principal: Principal,
    /// The client program.
    pub client: ClientInfo,
    /// For a node: what it offers.
    pub node: Option<NodeInfo>,
}

/// What to do with a frame that did not authenticate the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Not a frame of the protocol: close 1007.
    NotAFrame,
    /// A request other than `connect`: answer `unauthorized` ("send connect first"), then
    /// close 1008.
    ConnectFirst {
        /// The request's id.
        id: String,
    },
    /// A response or an event before `connect`: close 1008 without an answer.
    Unexpected,
    /// A `connect` that fails: answer the error (`bad_request` or `unauthorized`), then
    /// close 1008.
    Connect {
        /// The request's id.
        id: String,
        /// `bad_request` or `unauthorized`.
        code: &'static str,
        /// For the client (never echoes its token).
        message: String,
    },
}

/// Checks one text frame received before `hello-ok`.
pub fn check(text: &str, principals: &Principals) -> Result<Accepted, Refused> {
    let frame = Frame::parse(text).map_err(|_| Refused::NotAFrame)?;
    let (id, params) = match frame {
        Frame::Req { id, method, params } if method == "connect" => (id, params),
        Frame::Req { id, .. } => return Err(Refused::ConnectFirst { id }),
        _ => return Err(Refused::Unexpected),
    };
    let bad = |id: &str, message: String| Refused::Connect {
        id: id.to_string(),
        code: code::BAD_REQUEST,
        message,
    };
    let params = parse_params(params).map_err(|m| bad(&id, m))?;
    let node = match (params.role, params.node) {
        (Role::Node, Some(node)) => Some(node),
        (Role::Node, None) => {
            return Err(bad(&id, "role node needs node {name, commands}".into()));
        }
        (_, _) => None,
    };
    let account = match (params.role, params.account) {
        (Role::Approver, Some(account)) => Some(account),
        (Role::Approver, None) => {
            return Err(bad(
                &id,
                "role approver needs account (the alias it serves)".into(),
            ));
        }
        (_, _) => None,
    };
    let principal = principals
        .authenticate(
            &params.token,
            params.role,
            node.as_ref().map(|n| n.name.as_str()),
            account.as_deref(),
        )
        .map_err(|e| Refused::Connect {
            id: id.clone(),
            code: code::UNAUTHORIZED,
            message: match e {
                AuthError::UnknownToken => "wrong token".to_string(),
                AuthError::WrongPrincipal(why) => why,
            },
        })?;
    Ok(Accepted {
        id,
        principal,
        client: params.client,
        node,
    })
}

/// The `connect` params, checked field by field.
fn parse_params(params: Value) -> Result<ConnectParams, String> {
    // serde's error would quote a token sent as a number: a credential is never echoed.
    if let Some(token) = params.get("token").filter(|t| !t.is_string()) {
        return Err(format!(
            "bad connect params: field `token`: expected a string, got {}",
            crate::json_kind(token)
        ));
    }
    let params: ConnectParams =
        serde_json::from_value(params).map_err(|e| format!("bad connect params: {e}"))?;
    if params.protocol != PROTOCOL_VERSION {
        return Err(format!(
            "unsupported protocol version {}; this gateway speaks {PROTOCOL_VERSION}",
            params.protocol
        ));
    }
    name("client.name", &params.client.name)?;
    if let Some(node) = &params.node {
        name("node.name", &node.name)?;
        if node.commands.len() > MAX_NODE_COMMANDS {
            return Err(format!(
                "node.commands: at most {MAX_NODE_COMMANDS} commands, got {}",
                node.commands.len()
            ));
        }
        for command in &node.commands {
            name("node.commands[].name", &command.name)?;
        }
    }
    if let Some(account) = &params.account {
        name("account", account)?;
    }
    Ok(params)
}

/// A name: 1 to [`MAX_NAME_LEN`] bytes, printable, no white space at either end.
fn name(field: &str, value: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        return Err(format!("{field}: must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(format!("{field}: longer than {MAX_NAME_LEN} bytes"));
    }
    if value.chars().any(char::is_control) || value.trim() != value {
        return Err(format!(
            "{field}: no control characters or surrounding spaces"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::auth::Secret;

    fn principals() -> Principals {
        let mut p = Principals::new();
        p.add_operator("ops", Secret::new("op"))
            .add_node("box", Secret::new("box"));
        p
    }

    fn connect(params: Value) -> String {
        json!({"type": "req", "id": "1", "method": "connect", "params": params}).to_string()
    }

    #[test]
    fn a_connect_with_the_right_credential_is_accepted() {
        let text = connect(json!({
            "protocol": 1, "role": "node", "token": "box",
            "client": {"name": "warden-node", "version": "0"},
            "node": {"name": "box", "commands": ["uptime", {"name": "disk", "approval": true}]}
        }));
        let accepted = check(&text, &principals()).expect("accepted");
        assert_eq!(accepted.principal.label(), "node:box");
        let node = accepted.node.expect("node");
        assert_eq!(
            node.commands
                .iter()
                .map(|c| (c.name.as_str(), c.approval))
                .collect::<Vec<_>>(),
            vec![("uptime", false), ("disk", true)]
        );
    }

    #[test]
    fn everything_else_is_refused_with_the_right_answer() {
        let p = principals();
        assert_eq!(check("nope", &p), Err(Refused::NotAFrame));
        assert_eq!(
            check(r#"{"type":"req","id":"7","method":"health"}"#, &p),
            Err(Refused::ConnectFirst { id: "7".into() })
        );
        assert_eq!(
            check(r#"{"type":"event","event":"x"}"#, &p),
            Err(Refused::Unexpected)
        );
        let refused = |params: Value| match check(&connect(params), &p) {
            Err(Refused::Connect { code, .. }) => code,
            other => panic!("{other:?}"),
        };
        let client = json!({"name": "c", "version": "0"});
        assert_eq!(
            refused(json!({"protocol": 1, "role": "operator", "token": "bad", "client": client})),
            code::UNAUTHORIZED
        );
        assert_eq!(
            refused(json!({"protocol": 2, "role": "operator", "token": "op", "client": client})),
            code::BAD_REQUEST
        );
        assert_eq!(
            refused(
                json!({"protocol": 1, "role": "approver", "token": "op", "client": client, "account": "nova"})
            ),
            code::UNAUTHORIZED
        );
        assert_eq!(
            refused(
                json!({"protocol": 1, "role": "node", "token": "op", "client": client, "node": {"name": "box", "commands": []}})
            ),
            code::UNAUTHORIZED
        );
        // Found by the `handshake` fuzz target's properties: a token of digits sent as a
        // JSON number came back in serde's error text.
        let mut digits = principals();
        digits.add_operator("ci", Secret::new("2026112901"));
        let text = connect(
            json!({"protocol": 1, "role": "operator", "token": 2026112901, "client": client}),
        );
        match check(&text, &digits) {
            Err(Refused::Connect { code, message, .. }) => {
                assert_eq!(code, code::BAD_REQUEST);
                assert!(!message.contains("2026112901"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let long = "x".repeat(MAX_NAME_LEN + 1);
        assert_eq!(
            refused(
                json!({"protocol": 1, "role": "node", "token": "box", "client": client, "node": {"name": long, "commands": []}})
            ),
            code::BAD_REQUEST
        );
    }
}
