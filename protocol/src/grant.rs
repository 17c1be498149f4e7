//! Approval grants: the single-use permission the approvals broker attaches to a
//! `node.invoke` of a command that needs approval.
//!
//! The gateway issues a grant only for an approval an approver approved, and only once
//! per approval. The grant is bound to the approval id, the node, the command, the exact
//! arguments (their SHA-256) and an expiry, and carries an HMAC-SHA256 keyed with the
//! credential the node authenticated with — so the node checks it with its own token,
//! without trusting the path the request took through the gateway. The node remembers the
//! grants it has used until they expire ([`UsedGrants`]): a replay is refused.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::auth::Secret;

/// A grant for one run of one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// The approval it was issued for.
    pub approval: String,
    /// When it stops being valid, ms since the Unix epoch.
    pub expires_at_ms: u64,
    /// A fresh random value, so two grants never share a MAC.
    pub nonce: String,
    /// HMAC-SHA256, hex, over the fields above plus the node, command and arguments.
    pub mac: String,
}

/// Why a grant does not admit a run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// No grant came with a command that needs one.
    #[error("this command needs an approval: ask through approvals.request")]
    Missing,
    /// The MAC does not match this node, command and arguments.
    #[error("the approval grant is not valid for this command and arguments")]
    Invalid,
    /// Past its expiry.
    #[error("the approval grant has expired")]
    Expired,
    /// Valid for longer than [`MAX_LIFETIME_MS`] from now.
    #[error("the approval grant is valid for too long")]
    TooLong,
    /// Used before.
    #[error("the approval grant was already used")]
    Replayed,
    /// Too many unexpired grants remembered.
    #[error("too many approval grants in use; try again later")]
    Full,
}

type HmacSha256 = Hmac<Sha256>;

/// The longest a grant may be valid for: a node refuses one that expires later than this
/// from now, so a grant replayed after the node restarted (which forgets the grants it
/// used) is good for at most this long. The gateway issues grants for the invocation's
/// timeout, capped at this.
pub const MAX_LIFETIME_MS: u64 = 15 * 60 * 1000;

impl Grant {
    /// Issues a grant for running `command` with `args` on `node`, for `approval`, keyed
    /// with the node's credential.
    pub fn issue(
        key: &Secret,
        approval: &str,
        node: &str,
        command: &str,
        args: &Value,
        expires_at_ms: u64,
    ) -> Self {
        let nonce = crate::hex(&rand::random::<[u8; 16]>());
        let mac = crate::hex(&mac(
            key,
            approval,
            node,
            command,
            args,
            expires_at_ms,
            &nonce,
        ));
        Self {
            approval: approval.to_string(),
            expires_at_ms,
            nonce,
            mac,
        }
    }

    /// Checks the grant for running `command` with `args` on `node` at `now_ms`, keyed with
    /// the node's own credential. Does not record its use: see [`UsedGrants`].
    pub fn verify(
        &self,
        key: &Secret,
        node: &str,
        command: &str,
        args: &Value,
        now_ms: u64,
    ) -> Result<(), GrantError> {
        let expected = mac(
            key,
            &self.approval,
            node,
            command,
            args,
            self.expires_at_ms,
            &self.nonce,
        );
        let given = crate::unhex(&self.mac).ok_or(GrantError::Invalid)?;
        // Constant time: the digests have a fixed length, and `ct_eq` does not stop early.
        if given.len() != expected.len()
            || !bool::from(subtle::ConstantTimeEq::ct_eq(&given[..], &expected[..]))
        {
            return Err(GrantError::Invalid);
        }
        if now_ms >= self.expires_at_ms {
            return Err(GrantError::Expired);
        }
        if self.expires_at_ms - now_ms > MAX_LIFETIME_MS {
            return Err(GrantError::TooLong);
        }
        Ok(())
    }
}

fn mac(
    key: &Secret,
    approval: &str,
    node: &str,
    command: &str,
    args: &Value,
    expires_at_ms: u64,
    nonce: &str,
) -> Vec<u8> {
    let args_digest = Sha256::digest(serde_json::to_string(args).unwrap_or_default().as_bytes());
    // HMAC accepts keys of any length.
    let Ok(mut m) = HmacSha256::new_from_slice(key.expose().as_bytes()) else {
        return Vec::new();
    };
    for part in [
        b"warden-grant-v1".as_slice(),
        approval.as_bytes(),
        node.as_bytes(),
        command.as_bytes(),
        &args_digest,
        expires_at_ms.to_string().as_bytes(),
        nonce.as_bytes(),
    ] {
        // Length-prefixed, so no two field splits give the same input.
        m.update(&(part.len() as u64).to_be_bytes());
        m.update(part);
    }
    m.finalize().into_bytes().to_vec()
}

/// The grants a node has used and that have not expired yet, bounded.
#[derive(Debug)]
pub struct UsedGrants {
    /// Nonce → expiry.
    used: BTreeMap<String, u64>,
    max: usize,
}

impl UsedGrants {
    /// Remembers at most `max` unexpired grants.
    pub fn new(max: usize) -> Self {
        Self {
            used: BTreeMap::new(),
            max,
        }
    }

    /// Verifies `grant` and records its use: a second use is [`GrantError::Replayed`].
    pub fn redeem(
        &mut self,
        grant: &Grant,
        key: &Secret,
        node: &str,
        command: &str,
        args: &Value,
        now_ms: u64,
    ) -> Result<(), GrantError> {
        grant.verify(key, node, command, args, now_ms)?;
        self.used.retain(|_, expires| *expires > now_ms);
        if self.used.contains_key(&grant.nonce) {
            return Err(GrantError::Replayed);
        }
        if self.used.len() >= self.max {
            return Err(GrantError::Full);
        }
        self.used.insert(grant.nonce.clone(), grant.expires_at_ms);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_grant_admits_exactly_its_run_once() {
        let key = Secret::new("node-token");
        let args = json!(["-h"]);
        let grant = Grant::issue(&key, "abcd1234", "box", "disk", &args, 1_000);
        let mut used = UsedGrants::new(8);
        assert_eq!(used.redeem(&grant, &key, "box", "disk", &args, 500), Ok(()));
        assert_eq!(
            used.redeem(&grant, &key, "box", "disk", &args, 600),
            Err(GrantError::Replayed)
        );
        let fresh = Grant::issue(&key, "abcd1234", "box", "disk", &args, 1_000);
        let wrong = [
            (Secret::new("other"), "box", "disk", json!(["-h"])),
            (key.clone(), "other", "disk", json!(["-h"])),
            (key.clone(), "box", "rm", json!(["-h"])),
            (key.clone(), "box", "disk", json!(["-h", "/"])),
        ];
        for (k, node, command, args) in wrong {
            assert_eq!(
                used.redeem(&fresh, &k, node, command, &args, 500),
                Err(GrantError::Invalid),
                "{node} {command} {args}"
            );
        }
        assert_eq!(
            used.redeem(&fresh, &key, "box", "disk", &args, 1_000),
            Err(GrantError::Expired)
        );
        let far = Grant::issue(&key, "a", "box", "disk", &args, 500 + MAX_LIFETIME_MS + 1);
        assert_eq!(
            used.redeem(&far, &key, "box", "disk", &args, 500),
            Err(GrantError::TooLong)
        );
        let mut forged = fresh.clone();
        forged.expires_at_ms = 10_000;
        assert_eq!(
            used.redeem(&forged, &key, "box", "disk", &args, 1_500),
            Err(GrantError::Invalid)
        );
    }

    #[test]
    fn a_grant_holds_for_arguments_relayed_as_text() {
        // The broker keys the grant with the arguments as it parsed them; the node checks
        // it against the arguments it parses from the relayed `node.invoke`.
        let key = Secret::new("node-token");
        let sent: Value = serde_json::from_str("[222222222222222222222222]").expect("json");
        let grant = Grant::issue(&key, "abcd1234", "box", "disk", &sent, 1_000);
        let relayed: Value = serde_json::from_str(&sent.to_string()).expect("json");
        assert_eq!(grant.verify(&key, "box", "disk", &relayed, 500), Ok(()));
    }

    #[test]
    fn used_grants_are_bounded_and_forgotten_at_expiry() {
        let key = Secret::new("k");
        let mut used = UsedGrants::new(1);
        let a = Grant::issue(&key, "a", "n", "c", &Value::Null, 100);
        let b = Grant::issue(&key, "b", "n", "c", &Value::Null, 200);
        assert_eq!(used.redeem(&a, &key, "n", "c", &Value::Null, 10), Ok(()));
        assert_eq!(
            used.redeem(&b, &key, "n", "c", &Value::Null, 20),
            Err(GrantError::Full)
        );
        assert_eq!(used.redeem(&b, &key, "n", "c", &Value::Null, 150), Ok(()));
    }
}
