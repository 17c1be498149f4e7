//! Principals: who may connect to the gateway, and as what.
//!
//! Every connection authenticates as a named principal; its role comes from the server's
//! config ([`Principals`]), never from the client's claim. A `connect` names a role (and,
//! for a node, a name; for an approval handler, an account) only so the server can check
//! that the credential really is that principal's:
//!
//! | credential | may connect as |
//! |---|---|
//! | `gateway.operators.<name>` (the old `gateway.token` is operator `default`) | operator `<name>`; a node whose name no config lists, only with `gateway.allow_unlisted_nodes` |
//! | `gateway.nodes.<name>` | node `<name>`, nothing else |
//! | an approval handler's in-memory credential | approver for its one account |
//!
//! Tokens are compared through their SHA-256 digests with [`subtle`], against every
//! configured credential without an early exit: the time taken depends neither on where
//! a wrong token differs nor on its length, nor on which principal (if any) it matches.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::Role;

/// A credential. `Debug` and `Display` never show it.
#[derive(Clone)]
pub struct Secret {
    text: Arc<str>,
    digest: [u8; 32],
}

impl Secret {
    /// A secret holding `text`.
    pub fn new(text: impl Into<String>) -> Self {
        let text: String = text.into();
        let digest = Sha256::digest(text.as_bytes()).into();
        Self {
            text: text.into(),
            digest,
        }
    }

    /// 32 random bytes, hex: a credential nobody configured (approval handlers, the
    /// generated operator token).
    pub fn generate() -> Self {
        let bytes: [u8; 32] = rand::random();
        Self::new(crate::hex(&bytes))
    }

    /// The secret itself, to send or to key a MAC with. Never log it.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// Whether `given` is this secret, in constant time (length included).
    pub fn matches(&self, given: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        bool::from(self.digest.ct_eq(&digest)) && !self.text.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        bool::from(self.digest.ct_eq(&other.digest))
    }
}

impl Eq for Secret {}

/// Whose credential a token is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// `gateway.operators.<name>`.
    Operator(String),
    /// `gateway.nodes.<name>`.
    Node(String),
    /// The approval handler of account `<alias>`.
    Approver(String),
}

/// An authenticated principal, as the server decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// An operator: every method but `approvals.resolve`.
    Operator {
        /// `gateway.operators.<name>`.
        name: String,
    },
    /// A node host: registers as `name`, answers `node.invoke`.
    Node {
        /// The name it holds.
        name: String,
        /// Who vouched for it: `node:<name>` for a configured node, `operator:<op>` for an
        /// unlisted node admitted with an operator's credential. Only the same holder may
        /// replace a live connection of that name.
        holder: String,
    },
    /// The approval handler of one Matrix account.
    Approver {
        /// The account alias.
        account: String,
    },
}

impl Principal {
    /// The role this principal has.
    pub fn role(&self) -> Role {
        match self {
            Principal::Operator { .. } => Role::Operator,
            Principal::Node { .. } => Role::Node,
            Principal::Approver { .. } => Role::Approver,
        }
    }

    /// The account an approval handler serves; none for other principals.
    pub fn account(&self) -> Option<&str> {
        match self {
            Principal::Approver { account } => Some(account),
            _ => None,
        }
    }

    /// A short label for logs: `operator:ops`, `node:build-box`, `approver:nova`.
    pub fn label(&self) -> String {
        match self {
            Principal::Operator { name } => format!("operator:{name}"),
            Principal::Node { name, .. } => format!("node:{name}"),
            Principal::Approver { account } => format!("approver:{account}"),
        }
    }
}

/// Why a credential does not admit a claim.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The token is nobody's.
    #[error("unknown token")]
    UnknownToken,
    /// The token is someone's, but not the claimed principal's.
    #[error("{0}")]
    WrongPrincipal(String),
}

/// Every credential the gateway accepts.
#[derive(Debug, Clone, Default)]
pub struct Principals {
    operators: BTreeMap<String, Secret>,
    nodes: BTreeMap<String, Secret>,
    approvers: BTreeMap<String, Secret>,
    allow_unlisted_nodes: bool,
}

impl Principals {
    /// No credential at all: every connection is refused.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) operator `name`.
    pub fn add_operator(&mut self, name: impl Into<String>, secret: Secret) -> &mut Self {
        self.operators.insert(name.into(), secret);
        self
    }

    /// Adds (or replaces) node `name`.
    pub fn add_node(&mut self, name: impl Into<String>, secret: Secret) -> &mut Self {
        self.nodes.insert(name.into(), secret);
        self
    }

    /// Adds (or replaces) the approval handler of `account`.
    pub fn add_approver(&mut self, account: impl Into<String>, secret: Secret) -> &mut Self {
        self.approvers.insert(account.into(), secret);
        self
    }

    /// Removes the approval handler of `account`; returns whether it had one.
    pub fn remove_approver(&mut self, account: &str) -> bool {
        self.approvers.remove(account).is_some()
    }

    /// These principals' operators and nodes with `other`'s approval handlers: what a
    /// config reload makes of the running set, whose handlers' credentials no config holds.
    pub fn with_approvers_of(mut self, other: &Principals) -> Self {
        self.approvers = other.approvers.clone();
        self
    }

    /// Whether `principal`, authenticated earlier with `secret`, would still be admitted
    /// as the very same principal: false once its credential was removed or changed (a
    /// config reload revoked it).
    pub fn still_admits(&self, principal: &Principal, secret: &Secret) -> bool {
        let (node, account) = match principal {
            Principal::Operator { .. } => (None, None),
            Principal::Node { name, .. } => (Some(name.as_str()), None),
            Principal::Approver { account } => (None, Some(account.as_str())),
        };
        self.authenticate(secret.expose(), principal.role(), node, account)
            .is_ok_and(|admitted| admitted == *principal)
    }

    /// Whether nodes no config lists may connect with an operator's credential.
    pub fn set_allow_unlisted_nodes(&mut self, allow: bool) -> &mut Self {
        self.allow_unlisted_nodes = allow;
        self
    }

    /// Whether no operator credential is configured.
    pub fn has_operators(&self) -> bool {
        !self.operators.is_empty()
    }

    /// Whether `name` is a configured node.
    pub fn is_listed_node(&self, name: &str) -> bool {
        self.nodes.contains_key(name)
    }

    /// The operator names, sorted.
    pub fn operator_names(&self) -> impl Iterator<Item = &str> {
        self.operators.keys().map(String::as_str)
    }

    /// Whose token `given` is. Every credential is compared, whatever matched before. A
    /// token that two principals share is nobody's (the config refuses that too): it
    /// must never make a node host an operator.
    pub fn identify(&self, given: &str) -> Option<Identity> {
        let mut found = None;
        let mut matches = 0usize;
        let all = self
            .operators
            .iter()
            .map(|(n, s)| (Identity::Operator(n.clone()), s))
            .chain(
                self.nodes
                    .iter()
                    .map(|(n, s)| (Identity::Node(n.clone()), s)),
            )
            .chain(
                self.approvers
                    .iter()
                    .map(|(n, s)| (Identity::Approver(n.clone()), s)),
            );
        for (identity, secret) in all {
            if secret.matches(given) {
                matches += 1;
                found = Some(identity);
            }
        }
        if matches == 1 { found } else { None }
    }

    /// The secret `principal` authenticated with: what approval grants for a node are
    /// keyed with.
    pub fn secret_of(&self, principal: &Principal) -> Option<&Secret> {
        match principal {
            Principal::Operator { name } => self.operators.get(name),
            Principal::Approver { account } => self.approvers.get(account),
            Principal::Node { name, holder } => match holder.strip_prefix("operator:") {
                Some(op) => self.operators.get(op),
                None => self.nodes.get(name),
            },
        }
    }

    /// Checks a `connect`: `token` must be the credential of the principal the claim
    /// names. `node` is the name a node claims; `account` the account an approval handler
    /// claims.
    pub fn authenticate(
        &self,
        token: &str,
        role: Role,
        node: Option<&str>,
        account: Option<&str>,
    ) -> Result<Principal, AuthError> {
        let identity = self.identify(token).ok_or(AuthError::UnknownToken)?;
        let wrong = |m: String| Err(AuthError::WrongPrincipal(m));
        match (role, identity) {
            (Role::Operator, Identity::Operator(name)) => Ok(Principal::Operator { name }),
            (Role::Node, Identity::Node(name)) => match node {
                Some(claimed) if claimed == name => Ok(Principal::Node {
                    holder: format!("node:{name}"),
                    name,
                }),
                _ => wrong(format!(
                    "this credential belongs to node {name:?}, not {:?}",
                    node.unwrap_or_default()
                )),
            },
            (Role::Node, Identity::Operator(op)) => {
                let claimed = node.unwrap_or_default();
                if self.nodes.contains_key(claimed) {
                    wrong(format!(
                        "node {claimed:?} is configured (gateway.nodes.{claimed}): connect with its own token"
                    ))
                } else if self.allow_unlisted_nodes {
                    Ok(Principal::Node {
                        name: claimed.to_string(),
                        holder: format!("operator:{op}"),
                    })
                } else {
                    wrong(format!(
                        "node {claimed:?} is not configured: add gateway.nodes.{claimed} with a token, \
                         or set gateway.allow_unlisted_nodes"
                    ))
                }
            }
            (Role::Approver, Identity::Approver(served)) => match account {
                Some(claimed) if claimed == served => Ok(Principal::Approver { account: served }),
                _ => wrong(format!(
                    "this credential serves account {served:?}, not {:?}",
                    account.unwrap_or_default()
                )),
            },
            (Role::Approver, _) => {
                wrong("role approver is held only by warden's own approval handlers".to_string())
            }
            (claimed, identity) => {
                let is = match identity {
                    Identity::Operator(_) => "an operator's",
                    Identity::Node(_) => "a node's",
                    Identity::Approver(_) => "an approval handler's",
                };
                wrong(format!(
                    "this is {is} credential; it cannot connect as {}",
                    claimed.as_str()
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principals() -> Principals {
        let mut p = Principals::new();
        p.add_operator("ops", Secret::new("op-token"))
            .add_node("box", Secret::new("box-token"))
            .add_approver("nova", Secret::new("nova-approver"));
        p
    }

    #[test]
    fn secrets_match_only_themselves_and_never_show() {
        let s = Secret::new("abc");
        assert!(s.matches("abc"));
        for other in ["", "ab", "abcd", "abC"] {
            assert!(!s.matches(other), "{other}");
        }
        assert!(
            !Secret::new("").matches(""),
            "an empty secret admits nobody"
        );
        assert_eq!(format!("{s:?}"), "Secret(****)");
        assert_ne!(Secret::generate(), Secret::generate());
        assert_eq!(Secret::generate().expose().len(), 64);
    }

    #[test]
    fn the_role_comes_from_the_credential_not_the_claim() {
        let p = principals();
        let ok = |t, r, n, a| p.authenticate(t, r, n, a);
        assert_eq!(
            ok("op-token", Role::Operator, None, None),
            Ok(Principal::Operator { name: "ops".into() })
        );
        assert_eq!(
            ok("box-token", Role::Node, Some("box"), None).map(|p| p.label()),
            Ok("node:box".into())
        );
        assert_eq!(
            ok("nova-approver", Role::Approver, None, Some("nova")),
            Ok(Principal::Approver {
                account: "nova".into()
            })
        );
        // Claims the credential does not back.
        let refused = [
            ("nope", Role::Operator, None, None),
            ("op-token", Role::Approver, None, Some("nova")),
            ("box-token", Role::Approver, None, Some("nova")),
            ("nova-approver", Role::Approver, None, Some("other")),
            ("box-token", Role::Operator, None, None),
            ("box-token", Role::Node, Some("other"), None),
            ("op-token", Role::Node, Some("box"), None),
            ("op-token", Role::Node, Some("unlisted"), None),
            ("nova-approver", Role::Operator, None, None),
        ];
        for (t, r, n, a) in refused {
            assert!(ok(t, r, n, a).is_err(), "{t} as {r:?} {n:?} {a:?}");
        }
        assert_eq!(
            ok("nope", Role::Operator, None, None),
            Err(AuthError::UnknownToken)
        );
    }

    #[test]
    fn unlisted_nodes_need_the_switch_and_are_held_by_their_operator() {
        let mut p = principals();
        p.set_allow_unlisted_nodes(true);
        let got = p.authenticate("op-token", Role::Node, Some("laptop"), None);
        assert_eq!(
            got,
            Ok(Principal::Node {
                name: "laptop".into(),
                holder: "operator:ops".into()
            })
        );
        let principal = got.expect("admitted");
        assert_eq!(p.secret_of(&principal), Some(&Secret::new("op-token")));
        // A configured name still needs its own token.
        assert!(
            p.authenticate("op-token", Role::Node, Some("box"), None)
                .is_err()
        );
    }
}
