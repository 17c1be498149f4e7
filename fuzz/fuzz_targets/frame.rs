//! Fuzz target `frame`: `Frame::parse` and the params parsers, on any text.
//!
//! Asserted beyond "no panic":
//! * a frame that parses re-serializes (`to_text`) to text that parses back to the same
//!   frame, and serializing that again gives the same text;
//! * every params parser (the hand-written `ApprovalRequestParams::parse`,
//!   `ApprovalResolveParams::parse`, `ApprovalNotifiedParams::parse`,
//!   `parse_approvals_list`, and serde of `ConnectParams`, `InvokeParams`,
//!   `NodeInvokeParams`, `SubscribeParams`) runs on the
//!   frame's value (`params`, or `payload` of a `res` or an event) without panicking;
//!   what serde accepts serializes back to a value serde reads back equal; what the
//!   hand-written parsers accept holds their documented invariants, and what they refuse
//!   names the field at fault (or says params must be an object).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use warden_protocol::{
    APPROVAL_TIMEOUT_S, APPROVALS_LIST_LIMIT, ApprovalNotifiedParams, ApprovalRequestParams,
    ApprovalResolveParams, ConnectParams, Frame, InvokeParams, MAX_MATRIX_ID_LEN,
    NodeInvokeParams, SubscribeParams, parse_approvals_list,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(frame) = Frame::parse(text) else {
        return;
    };
    let again = frame.to_text();
    assert_eq!(
        Frame::parse(&again).as_ref(),
        Ok(&frame),
        "a parsed frame must parse back equal from its own text {again:?}"
    );
    assert_eq!(Frame::parse(&again).map(|f| f.to_text()), Ok(again.clone()));

    let value = match frame {
        Frame::Req { params, .. } => params,
        Frame::Res { payload, .. } => payload.unwrap_or(Value::Null),
        Frame::Event { payload, .. } => payload,
    };
    params_parsers(value);
});

fn params_parsers(value: Value) {
    serde_round_trip::<ConnectParams>(&value);
    serde_round_trip::<InvokeParams>(&value);
    serde_round_trip::<NodeInvokeParams>(&value);
    serde_round_trip::<SubscribeParams>(&value);

    match ApprovalRequestParams::parse(value.clone()) {
        Ok(p) => {
            for s in [&p.node, &p.command, &p.reason] {
                assert!(!s.trim().is_empty(), "accepted an empty string: {p:?}");
            }
            if let Some(t) = p.timeout_s {
                assert!(
                    APPROVAL_TIMEOUT_S.contains(&t),
                    "timeout out of range: {p:?}"
                );
            }
        }
        Err(message) => names_its_fault(&message),
    }
    // A Matrix ID field: not empty, no white space, at most MAX_MATRIX_ID_LEN bytes.
    let matrix_id = |s: &str| {
        !s.is_empty() && s.len() <= MAX_MATRIX_ID_LEN && !s.chars().any(char::is_whitespace)
    };
    match ApprovalResolveParams::parse(value.clone()) {
        Ok(p) => {
            assert!(p.id.is_some() || p.relates_to.is_some(), "nothing names the approval: {p:?}");
            assert!(p.id.as_deref().is_none_or(|id| !id.trim().is_empty()), "{p:?}");
            for s in [&p.by, &p.room_id, &p.event_id] {
                assert!(matrix_id(s), "accepted a bad Matrix ID: {p:?}");
            }
            assert!(p.relates_to.as_deref().is_none_or(matrix_id), "{p:?}");
        }
        Err(message) => names_its_fault(&message),
    }
    match ApprovalNotifiedParams::parse(value.clone()) {
        Ok(p) => {
            assert!(!p.id.trim().is_empty(), "{p:?}");
            for s in [&p.approver, &p.room_id, &p.event_id] {
                assert!(matrix_id(s), "accepted a bad Matrix ID: {p:?}");
            }
        }
        Err(message) => names_its_fault(&message),
    }
    let empty = matches!(&value, Value::Null) || value.as_object().is_some_and(|m| m.is_empty());
    match parse_approvals_list(value) {
        Ok(p) => assert!(
            APPROVALS_LIST_LIMIT.contains(&p.limit),
            "limit out of range: {p:?}"
        ),
        Err(message) => {
            assert!(!empty, "approvals.list refused empty params: {message}");
            names_its_fault(&message);
        }
    }
}

/// What serde reads from `value`, written back, reads back equal.
fn serde_round_trip<T>(value: &Value)
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    if let Ok(parsed) = serde_json::from_value::<T>(value.clone()) {
        let written = serde_json::to_value(&parsed).expect("a params type serializes");
        let back = serde_json::from_value::<T>(written.clone());
        assert_eq!(
            back.as_ref().ok(),
            Some(&parsed),
            "written back as {written}"
        );
    }
}

/// The hand-written parsers' errors name the field at fault, or the params' kind.
fn names_its_fault(message: &str) {
    assert!(
        message.starts_with("field `") || message.starts_with("params must be an object"),
        "unexpected error text: {message}"
    );
}
