//! Fuzz target `handshake`: `warden_protocol::handshake::check`, the decision taken on
//! the first frame of a socket, against fixed principals: operator `ops`, node `box` (a
//! token of digits only, as a config may hold), the approval handler of account `nova`.
//! The first input byte chooses whether unlisted nodes are allowed (its low bit: the
//! seeds start with `0` or `1`); the rest is the frame's text.
//!
//! Asserted beyond "no panic":
//! * nothing is accepted unless the `connect`'s `token` is a configured token, and it is
//!   the credential of the principal accepted (a node's own for a configured node; the
//!   operator's, with the switch on, for an unlisted one);
//! * the accepted principal has the role the `connect` claimed, and the node name or
//!   account it claimed;
//! * a refusal never echoes the `token` field, and never shows a configured token the
//!   frame did not carry elsewhere: a client that puts a token where its node name or
//!   role goes sees its own text in the error, and nothing more;
//! * the refusal kind matches the frame: not a frame, a request other than `connect`,
//!   a response or event, or a failed `connect` answered under the request's id.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use warden_protocol::auth::{Principal, Principals, Secret};
use warden_protocol::handshake::{Refused, check};
use warden_protocol::{Frame, code};

const OPERATOR_TOKEN: &str = "op-7Hq2xLw9";
const NODE_TOKEN: &str = "2026112901";
const APPROVER_TOKEN: &str = "appr-Nc8eT3ym";
const TOKENS: [&str; 3] = [OPERATOR_TOKEN, NODE_TOKEN, APPROVER_TOKEN];

/// The principals, without and with unlisted nodes allowed.
fn principals(allow_unlisted_nodes: bool) -> &'static Principals {
    static BOTH: OnceLock<[Principals; 2]> = OnceLock::new();
    let both = BOTH.get_or_init(|| {
        [false, true].map(|allow| {
            let mut p = Principals::new();
            p.add_operator("ops", Secret::new(OPERATOR_TOKEN))
                .add_node("box", Secret::new(NODE_TOKEN))
                .add_approver("nova", Secret::new(APPROVER_TOKEN))
                .set_allow_unlisted_nodes(allow);
            p
        })
    });
    &both[usize::from(allow_unlisted_nodes)]
}

fuzz_target!(|data: &[u8]| {
    let Some((&switches, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let allow_unlisted = switches & 1 == 1;
    let outcome = check(text, principals(allow_unlisted));
    let frame = Frame::parse(text);

    match outcome {
        Ok(accepted) => {
            let Ok(Frame::Req { id, method, params }) = frame else {
                panic!("accepted something that is not a request: {text:?}");
            };
            assert_eq!(method, "connect");
            assert_eq!(accepted.id, id);
            let token = params.get("token").and_then(Value::as_str);
            assert!(
                token.is_some_and(|t| TOKENS.contains(&t)),
                "accepted without a configured token: {text:?}"
            );
            let claimed_role = params.get("role").and_then(Value::as_str);
            assert_eq!(
                Some(accepted.principal.role().as_str()),
                claimed_role,
                "accepted as another role than claimed: {accepted:?}"
            );
            let claimed_node = params.pointer("/node/name").and_then(Value::as_str);
            let claimed_account = params.get("account").and_then(Value::as_str);
            match &accepted.principal {
                Principal::Operator { name } => {
                    assert_eq!((name.as_str(), token), ("ops", Some(OPERATOR_TOKEN)));
                }
                Principal::Node { name, holder } => {
                    assert_eq!(Some(name.as_str()), claimed_node);
                    assert_eq!(
                        accepted.node.as_ref().map(|n| n.name.as_str()),
                        claimed_node
                    );
                    if name == "box" {
                        assert_eq!((holder.as_str(), token), ("node:box", Some(NODE_TOKEN)));
                    } else {
                        assert!(allow_unlisted, "unlisted node {name:?} admitted");
                        assert_eq!(
                            (holder.as_str(), token),
                            ("operator:ops", Some(OPERATOR_TOKEN))
                        );
                    }
                }
                Principal::Approver { account } => {
                    assert_eq!(Some(account.as_str()), claimed_account);
                    assert_eq!((account.as_str(), token), ("nova", Some(APPROVER_TOKEN)));
                }
            }
        }
        Err(Refused::NotAFrame) => assert!(frame.is_err(), "refused a frame: {text:?}"),
        Err(Refused::ConnectFirst { id }) => {
            assert!(
                matches!(&frame, Ok(Frame::Req { id: i, method, .. }) if *i == id && method != "connect"),
                "{frame:?}"
            );
        }
        Err(Refused::Unexpected) => {
            assert!(
                matches!(frame, Ok(Frame::Res { .. } | Frame::Event { .. })),
                "{frame:?}"
            );
        }
        Err(Refused::Connect { id, code, message }) => {
            assert!(
                matches!(&frame, Ok(Frame::Req { id: i, method, .. }) if *i == id && method == "connect"),
                "{frame:?}"
            );
            assert!(
                code == code::BAD_REQUEST || code == code::UNAUTHORIZED,
                "{code}"
            );
            let elsewhere = sent_outside_the_token_field(text);
            for token in TOKENS {
                assert!(
                    !message.contains(token) || elsewhere.iter().any(|s| s.contains(token)),
                    "a refusal shows a configured token: {message:?}"
                );
            }
        }
    }
});

/// Every string, key and number of the frame's JSON, as text, but the value of
/// `params.token`.
fn sent_outside_the_token_field(text: &str) -> Vec<String> {
    fn walk(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::String(s) => out.push(s.clone()),
            Value::Number(n) => out.push(n.to_string()),
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            Value::Object(map) => {
                for (k, v) in map {
                    out.push(k.clone());
                    walk(v, out);
                }
            }
            Value::Null | Value::Bool(_) => {}
        }
    }
    let mut out = Vec::new();
    let Ok(mut frame) = serde_json::from_str::<Value>(text) else {
        return out;
    };
    if let Some(params) = frame.get_mut("params").and_then(Value::as_object_mut) {
        params.remove("token");
    }
    walk(&frame, &mut out);
    out
}
