//! The approvals broker: an operator asks for a node command, an approver decides, and an
//! approved command runs on its node.
//!
//! `approvals.request {node, command, args?, reason, timeout_s?, account?}` (operator)
//! creates an approval with a random 8-character id (lowercase letters and digits), gives
//! each distinct approver one account to be told through ([`ApprovalRouting`]), stores it
//! and emits `approval.requested {id, node, command, args, reason, expires_at_ms, notify:
//! [{approver, account}]}` to the sessions subscribed to it. The request stays open: it is answered once the approval is
//! over, with `{id, decision, by, result?, error?}` — the same payload as the event
//! `approval.resolved` every subscribed session gets then. A requester whose session is
//! gone by then is simply not answered. A node that never connected (`unknown_node`) or,
//! while connected, did not declare the command (`unknown_command`) is refused at once; an
//! offline node is accepted, as it may be back by the decision.
//!
//! ## Notifications
//! An approval handler reports each message it sent with `approvals.notified {id,
//! approver, room_id, event_id}` (approver; only for a notice of its own account, else
//! `forbidden`); the broker stores it, and `approvals.list` shows each open approval's
//! `notices`, so a restarted handler sends only what was never delivered. An account can
//! notify when its chat account is ready and its handler connected
//! ([`GatewayState::can_notify`]). Every sweep ([`ApprovalsMsg::Sweep`], each second or a
//! quarter of `renotify_after`, and at once when a reload changes the routing) retires the
//! notices of accounts that no longer list their approver, hands an approver over to
//! another account once, when theirs could not notify for `renotify_after` while that
//! other one could (a shared outage moves nothing), and gives an account to approvers that
//! have none (approvals stored by an earlier version, approvers a reload added). New
//! notices are announced as `approval.notify`, `approval.requested`'s payload with only
//! the new `notify` entries. An approval pinned to an `account` is never handed over.
//!
//! `approvals.resolve {id?, decision: approve|deny, by, room_id, event_id, relates_to?}`
//! (approver) counts only when `by` is an approver of the account the session named in
//! `connect` (compared case-insensitively), else `forbidden`; and only when it was made
//! where `by` was asked: in the room of a delivered notice to `by` through that account
//! and, when it `relates_to` an event (a reaction, a reply), on that notice's message, else
//! `forbidden`. Without `id` the approval is the one whose request message `relates_to`
//! names (`unknown_approval` if none). The first decision wins: later ones get
//! `already_resolved`; an id the broker does not know gets `unknown_approval`. The answer is
//! `{id, decision}` with `decision` `approved` or `denied`, and the record keeps `via
//! {account, room_id, event_id}`. No decision within the timeout (default 300 s,
//! `timeout_s` within 1..=86400) is a denial by `timeout`.
//!
//! An approval, once approved, runs its command the way `nodes.invoke` does (registry
//! lookup, the node's session, [`DEFAULT_INVOKE_TIMEOUT_MS`]); the outcome carries the
//! node's payload as `result`, or `error {code, message}` when it could not run or failed.
//!
//! ## Limits
//! One operator token must not be able to grow the gateway without bound, so a request is
//! refused, before anything is stored, when:
//!
//! | what | limit (a field of [`ApprovalsSettings`]) | answer |
//! |---|---|---|
//! | `reason`, in bytes of UTF-8 | [`DEFAULT_MAX_REASON_BYTES`] (4 KiB), `max_reason_bytes` | `too_large`, naming the field and the limit |
//! | `args`, in bytes of compact JSON | [`DEFAULT_MAX_ARGS_BYTES`] (16 KiB), `max_args_bytes` | `too_large`, naming the field and the limit |
//! | open approvals (pending, or approved with the command running) | [`DEFAULT_MAX_OPEN`] (1,000), `max_open` | `busy`, naming the cap |
//! | open approvals of one requester (its principal, `operator:<name>`) | [`DEFAULT_MAX_OPEN_PER_REQUESTER`] (200), `max_open_per_requester` | `busy`, naming the cap |
//!
//! Resolved approvals are bounded by [`KEEP_RESOLVED`]. At start, an approval file larger
//! than [`MAX_FILE_BYTES`] (1 MiB, far above what the limits above let the broker write) is
//! skipped with a WARN naming it and its size, and left in place; its size is read from
//! the metadata, so it is never read into memory.
//!
//! ## `approvals.list`
//! `approvals.list {limit?, cursor?}` (operator, approver) answers one page, `{approvals:
//! [...], next?}`: the approvals still open (pending, or approved with their command
//! running), oldest request first (by `requested_at_ms`, then id), then the last
//! [`KEEP_RESOLVED`] resolved ones, flagged `resolved: true`, most recently decided first
//! (by `decided_at_ms`, then id, both descending). `limit` is 1..=200, default 50
//! ([`APPROVALS_LIST_LIMIT`](super::protocol::APPROVALS_LIST_LIMIT)). When more entries
//! follow, `next` is a cursor (`o<requested_at_ms>-<id>` or `r<decided_at_ms>-<id>`: the
//! sort key of the page's last entry); passing it as `cursor` gives the entries after that
//! key. A cursor is a key, not an index, so it never goes stale: an entry that stays where
//! it is between pages is listed exactly once; new requests come after the open ones
//! already seen; an approval decided between pages may be seen once open and again
//! resolved; one resolved after the pages reached the resolved part is newer than the
//! cursor and not listed. Every page is bounded: at most 200 entries of at most
//! `max_reason_bytes + max_args_bytes` each.
//!
//! ## Storage
//! One JSON file per approval, `<state.dir>/approvals/<id>.json` (mode 0600, the directory
//! 0700), written to a temporary file and renamed over the old one, at creation, at the
//! decision and when the command's outcome arrives. Only the last [`KEEP_RESOLVED`]
//! resolved approvals keep their files. On start the broker reads them back: a pending
//! approval past its expiry is denied by `timeout`, the others get a timer for the time
//! they have left; an approval approved before the stop whose outcome never arrived ends
//! with error `internal` (the command may or may not have run: it is never run twice).
//!
//! ## Messages
//! From sessions, through the [`ApprovalsClient`] in [`GatewayState`]: `Request`, `Resolve`
//! and `Notified` (with the session's account), `List` (with its page params), each with
//! the [`ReplyTo`] whose reply port the asking session waits on. Timers: `Expire` (a
//! pending approval's timeout), `Sweep` (periodic). From the task awaiting a node's answer:
//! `InvokeDone`. From a reload: `PrincipalsChanged`.
//!
//! ## Supervision
//! `root/gateway/approvals`, between `listener` and `sessions` under the `gateway`
//! supervisor (`rest_for_one`), present only when the program called
//! [`GatewayState::set_approvals`]. It owns its expiry timers and one task per running
//! command, aborted when its state drops (a stop, a crash, a kill). Requesters still
//! waiting when it stops are told so (error `internal`; the approval stays on disk).
//!
//! ## Restart policy
//! Kind `approvals_broker`, permanent: 200 ms → 10 s, unlimited. A restart reloads every
//! approval from disk and (rest_for_one) restarts the sessions. A state directory it cannot
//! read or write does not fail the broker — that would take every session down with it —
//! it logs an ERROR and refuses the requests it cannot store (`internal`).

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::hub::event;
use super::invoke::{InvokeReply, dispatch_invoke};
use super::protocol::{
    ApprovalCursor, ApprovalListing, ApprovalNotice, ApprovalNotifiedParams, ApprovalOutcome,
    ApprovalPage, ApprovalRequestParams, ApprovalRequested, ApprovalResolveParams,
    ApprovalResolved, ApprovalsListParams, DEFAULT_INVOKE_TIMEOUT_MS, DecidedVia, Decision,
    ErrorBody, Frame, ListSection, NoticeTarget, Verdict, code,
};
use super::registry::Lookup;
use super::{GatewayState, metrics, now_ms};
use crate::supervision::{Backoff, ChildContext, ChildSpec, Policy, PolicyCell, Restart};
use crate::task::{self, AbortOnDrop, Timer};

/// The kind of the broker, for policies and metrics.
pub const KIND: &str = "approvals_broker";

/// The broker's built-in policy: 200 ms → 10 s, otherwise [`Policy::DEFAULT`].
pub const DEFAULT_POLICY: Policy = Policy {
    backoff: Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(10),
        ..Policy::DEFAULT.backoff
    },
    ..Policy::DEFAULT
};

/// The broker's id under `gateway`.
pub const ID: &str = "approvals";

/// How long an approval waits for a decision unless the request says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Resolved approvals kept (in memory, on disk, in `approvals.list`).
pub const KEEP_RESOLVED: usize = 50;

/// Open approvals (pending, or approved with the command running) at most; past it
/// `approvals.request` gets `busy`.
pub const DEFAULT_MAX_OPEN: usize = 1_000;

/// Open approvals one requester (an operator principal) may hold at most; past it, `busy`.
/// One operator cannot take the whole gateway's cap.
pub const DEFAULT_MAX_OPEN_PER_REQUESTER: usize = 200;

/// Longest `reason` of `approvals.request`, in bytes; past it, `too_large`.
pub const DEFAULT_MAX_REASON_BYTES: usize = 4 * 1024;

/// Largest `args` of `approvals.request`, in bytes of compact JSON; past it, `too_large`.
pub const DEFAULT_MAX_ARGS_BYTES: usize = 16 * 1024;

/// Largest approval file read back at start; a larger one is skipped (and left in place).
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The `by` of an approval nobody decided in time.
pub const TIMEOUT_BY: &str = "timeout";

/// The `by` of a pending approval denied because a reload revoked its requester.
pub const REVOKED_BY: &str = "requester revoked";

/// Length of an approval id.
pub const ID_LEN: usize = 8;

const ID_ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// What the broker needs from the program's config. The gateway knows no Matrix types: the
/// program fills this from the `[matrix.accounts.*]` that enable approvals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalsSettings {
    /// Where approvals are stored (`<state.dir>/approvals`); created 0700 if missing.
    pub dir: PathBuf,
    /// Approvers (user IDs) by account alias: an approver session naming the account in
    /// `connect` may resolve as any of them.
    pub approvers: BTreeMap<String, Vec<String>>,
    /// The account that notifies an approver it lists, when ready
    /// (`approvals.default_account`).
    pub default_account: Option<String>,
    /// How long a notifying account may stay down before its approvers are notified through
    /// another one (`approvals.renotify_after_ms`). Default [`DEFAULT_RENOTIFY_AFTER`].
    pub renotify_after: Duration,
    /// How long an approval waits for a decision without `timeout_s`. Default
    /// [`DEFAULT_TIMEOUT`].
    pub default_timeout: Duration,
    /// Open approvals at most (pending or running). Default [`DEFAULT_MAX_OPEN`].
    pub max_open: usize,
    /// Open approvals of one requester at most. Default [`DEFAULT_MAX_OPEN_PER_REQUESTER`].
    pub max_open_per_requester: usize,
    /// Longest `reason`, in bytes. Default [`DEFAULT_MAX_REASON_BYTES`].
    pub max_reason_bytes: usize,
    /// Largest `args`, in bytes of compact JSON. Default [`DEFAULT_MAX_ARGS_BYTES`].
    pub max_args_bytes: usize,
}

impl ApprovalsSettings {
    /// Settings storing into `dir`, with no approvers and the default timeout and limits.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            approvers: BTreeMap::new(),
            default_account: None,
            renotify_after: DEFAULT_RENOTIFY_AFTER,
            default_timeout: DEFAULT_TIMEOUT,
            max_open: DEFAULT_MAX_OPEN,
            max_open_per_requester: DEFAULT_MAX_OPEN_PER_REQUESTER,
            max_reason_bytes: DEFAULT_MAX_REASON_BYTES,
            max_args_bytes: DEFAULT_MAX_ARGS_BYTES,
        }
    }

    /// Refuses a request over a limit, before anything is stored: `too_large` for a
    /// `reason` or `args` over its size, `busy` when `open` approvals already reach
    /// `max_open`.
    fn check_request(
        &self,
        params: &ApprovalRequestParams,
        open: usize,
    ) -> Result<(), (&'static str, String)> {
        let reason = params.reason.len();
        if reason > self.max_reason_bytes {
            let message = format!(
                "field `reason`: {reason} bytes, over the limit of {} bytes",
                self.max_reason_bytes
            );
            return Err((code::TOO_LARGE, message));
        }
        let args = json_len(&params.args);
        if args > self.max_args_bytes {
            let message = format!(
                "field `args`: {args} bytes of JSON, over the limit of {} bytes",
                self.max_args_bytes
            );
            return Err((code::TOO_LARGE, message));
        }
        if open >= self.max_open {
            let message = format!(
                "{open} approvals are open, the cap of this gateway ({} open approvals); \
                 try again once some are decided",
                self.max_open
            );
            return Err((code::BUSY, message));
        }
        Ok(())
    }

    /// Whether a session serving `account` may decide as `by`.
    pub fn may_decide(&self, account: Option<&str>, by: &str) -> bool {
        may_decide(&self.approvers, account, by)
    }

    /// The routing part of these settings (what a reload may change).
    pub fn routing(&self) -> ApprovalRouting {
        ApprovalRouting {
            approvers: self.approvers.clone(),
            default_account: self.default_account.clone(),
            renotify_after: self.renotify_after,
        }
    }
}

/// How long a notifying account may stay down before its approvers are notified through
/// another account, unless `approvals.renotify_after_ms` says otherwise.
pub const DEFAULT_RENOTIFY_AFTER: Duration = Duration::from_secs(60);

/// Who approves for which account and which account tells them: what the broker reads at
/// every request, decision and sweep (a config reload replaces it).
///
/// Each distinct approver of a request is notified once, through one account: the
/// request's `account` if it named one (then only that account's approvers are asked);
/// else `default_account` if it lists the approver and is ready; else the first ready
/// account, by alias, that lists the approver. With none ready, the default account (or
/// the first listing one) is chosen anyway and notifies once it is up; a notifying
/// account down for `renotify_after` hands the approver to another ready account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRouting {
    /// Approvers (user IDs) by account alias.
    pub approvers: BTreeMap<String, Vec<String>>,
    /// The account preferred for notifying.
    pub default_account: Option<String>,
    /// How long a notifying account may stay down before another one takes over.
    pub renotify_after: Duration,
}

impl Default for ApprovalRouting {
    fn default() -> Self {
        Self {
            approvers: BTreeMap::new(),
            default_account: None,
            renotify_after: DEFAULT_RENOTIFY_AFTER,
        }
    }
}

impl ApprovalRouting {
    /// Whether `account` lists `approver` (case-insensitively).
    fn lists(&self, account: &str, approver: &str) -> bool {
        may_decide(&self.approvers, Some(account), approver)
    }

    /// `approver` as `account` lists it (user IDs are compared case-insensitively here, but
    /// the homeserver takes them as spelled).
    fn spelling(&self, account: &str, approver: &str) -> String {
        let wanted = approver.to_lowercase();
        self.approvers
            .get(account)
            .and_then(|list| list.iter().find(|a| a.to_lowercase() == wanted))
            .cloned()
            .unwrap_or_else(|| approver.to_string())
    }

    /// The distinct approvers (case-insensitively; the first spelling kept) of `pinned`,
    /// or of every account.
    fn approvers_for(&self, pinned: Option<&str>) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        self.approvers
            .iter()
            .filter(|(account, _)| pinned.is_none_or(|p| p == account.as_str()))
            .flat_map(|(_, list)| list.iter())
            .filter(|a| seen.insert(a.to_lowercase()))
            .cloned()
            .collect()
    }

    /// The account to notify `approver` through (see [`ApprovalRouting`]); `avoid` is a
    /// notifying account that stayed down: only a ready account other than it is chosen,
    /// or none.
    fn route(
        &self,
        pinned: Option<&str>,
        approver: &str,
        ready: impl Fn(&str) -> bool,
        avoid: Option<&str>,
    ) -> Option<String> {
        if let Some(account) = pinned {
            return (avoid.is_none() && self.lists(account, approver)).then(|| account.into());
        }
        let listing: Vec<&String> = self
            .approvers
            .keys()
            .filter(|a| self.lists(a, approver) && avoid != Some(a.as_str()))
            .collect();
        let default = self
            .default_account
            .as_ref()
            .filter(|d| listing.contains(d));
        if let Some(d) = default.filter(|d| ready(d)) {
            return Some(d.clone());
        }
        if let Some(first) = listing.iter().find(|a| ready(a)) {
            return Some((*first).clone());
        }
        if avoid.is_some() {
            return None;
        }
        default.or(listing.first().copied()).cloned()
    }
}

/// Whether a session serving `account` may decide as `by`, given the approvers by account.
pub fn may_decide(
    approvers: &BTreeMap<String, Vec<String>>,
    account: Option<&str>,
    by: &str,
) -> bool {
    let by = by.to_lowercase();
    account
        .and_then(|a| approvers.get(a))
        .is_some_and(|list| list.iter().any(|u| u.to_lowercase() == by))
}

/// How sessions reach the broker; follows it across restarts.
#[derive(Clone, Default)]
pub struct ApprovalsClient(Arc<RwLock<Option<ActorRef<ApprovalsMsg>>>>);

impl fmt::Debug for ApprovalsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApprovalsClient")
    }
}

/// The broker is not running (starting, restarting, or the tree is stopping).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the approvals broker is not running; try again shortly")]
pub struct ApprovalsUnavailable;

impl ApprovalsClient {
    /// Sends `msg` to the running broker.
    pub fn send(&self, msg: ApprovalsMsg) -> Result<(), ApprovalsUnavailable> {
        let actor = self.current().ok_or(ApprovalsUnavailable)?;
        actor.send_message(msg).map_err(|_| ApprovalsUnavailable)
    }

    fn current(&self) -> Option<ActorRef<ApprovalsMsg>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, actor: Option<ActorRef<ApprovalsMsg>>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = actor;
    }
}

/// Where the answer to one session request goes: the reply port the asking session waits
/// on, and the request's id, which the answer's frame carries.
pub struct ReplyTo {
    port: RpcReplyPort<Frame>,
    req_id: String,
}

impl ReplyTo {
    /// The answer to request `req_id`, through `port`.
    pub fn new(port: RpcReplyPort<Frame>, req_id: impl Into<String>) -> Self {
        Self {
            port,
            req_id: req_id.into(),
        }
    }

    /// Sends the frame; a session that is gone is not an error.
    fn frame(self, make: impl FnOnce(String) -> Frame) {
        let frame = make(self.req_id);
        let _ = self.port.send(frame);
    }

    fn ok(self, payload: Value) {
        self.frame(|id| Frame::ok(id, payload));
    }

    fn err(self, code: &str, message: impl Into<String>) {
        self.frame(|id| Frame::err(id, code, message));
    }
}

/// Messages of [`ApprovalsActor`].
pub enum ApprovalsMsg {
    /// `approvals.request` from an operator; answered when the approval is over.
    Request {
        /// The checked params.
        params: ApprovalRequestParams,
        /// Who asks: the session's principal (`operator:<name>`).
        requester: String,
        /// The requester.
        reply: ReplyTo,
    },
    /// `approvals.resolve` from an approver.
    Resolve {
        /// The checked params.
        params: ApprovalResolveParams,
        /// The account the session named in `connect`.
        account: Option<String>,
        /// The approver's session.
        reply: ReplyTo,
    },
    /// `approvals.notified` from an approver: a notification was delivered.
    Notified {
        /// The checked params.
        params: ApprovalNotifiedParams,
        /// The account the session named in `connect`.
        account: Option<String>,
        /// The approver's session.
        reply: ReplyTo,
    },
    /// Time to look at the notifying accounts: approvers not yet assigned an account get
    /// one, and those whose account stayed down past `renotify_after` get another.
    Sweep,
    /// `approvals.list`: one page.
    List {
        /// The checked params: page size and where to start.
        params: ApprovalsListParams,
        /// The asking session.
        reply: ReplyTo,
    },
    /// Approval `id`'s timeout is over.
    Expire {
        /// The approval.
        id: String,
    },
    /// The node answered approval `id`'s command (or could not).
    InvokeDone {
        /// The approval.
        id: String,
        /// The node's payload, or why there is none.
        result: Result<Value, ErrorBody>,
    },
    /// The gateway's principals changed (a config reload): every pending approval whose
    /// requesting operator is no longer configured is denied (by [`REVOKED_BY`]), so that
    /// a revoked operator's requests cannot be approved later. The broker checks the same
    /// when it loads its approvals, before each decision, and on each new request.
    PrincipalsChanged,
}

/// The spec of the broker: permanent, under `gateway`, over `state`'s approvals settings.
pub fn spec(state: &GatewayState, policy: PolicyCell) -> ChildSpec {
    let state = state.clone();
    ChildSpec::new(ID, KIND, Restart::Permanent, move |ctx: ChildContext| {
        let args = ApprovalsArgs {
            gateway: state.clone(),
            span: ctx.span(),
        };
        async move {
            let (actor, _) =
                Actor::spawn_linked(None, ApprovalsActor, args, ctx.supervisor.clone()).await?;
            Ok(actor.get_cell())
        }
    })
    .with_policy_cell(policy)
}

/// A fresh approval id: [`ID_LEN`] random lowercase letters and digits.
pub fn new_id() -> String {
    let mut rng = rand::rng();
    (0..ID_LEN)
        .map(|_| char::from(ID_ALPHABET[rng.random_range(0..ID_ALPHABET.len())]))
        .collect()
}

/// Whether `id` has the shape of an approval id.
pub fn is_valid_id(id: &str) -> bool {
    id.len() == ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// One approval, as stored on disk (its own format, not a wire type).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Approval {
    id: String,
    node: String,
    command: String,
    #[serde(default)]
    args: Value,
    reason: String,
    /// The principal that asked (`operator:<name>`); empty in files of earlier versions.
    #[serde(default)]
    requester: String,
    requested_at_ms: u64,
    expires_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    decision: Option<Decision>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    decided_at_ms: Option<u64>,
    /// Approved: what the command gave, once it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outcome: Option<Outcome>,
    /// The one account the requester named: only it notifies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    account: Option<String>,
    /// Every notification: one current per approver, and those it replaced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    notices: Vec<Notice>,
    /// Decided by an approver: through which account, in which room, by which event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    via: Option<DecidedVia>,
}

/// One approver told (or to be told) about one approval through one account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Notice {
    approver: String,
    account: String,
    /// When the account was chosen.
    assigned_at_ms: u64,
    /// Replaced by a notice through another account (its account stayed down, or no longer
    /// lists the approver).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    superseded: bool,
    /// Made by a hand-over: the approver's first account stayed down. One per approver.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    handed_over: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    room_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    event_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    delivered_at_ms: Option<u64>,
    /// When it was made (or the broker loaded it), on the runtime's clock: an account
    /// must stay down this long after it, too, before the approver is handed on.
    #[serde(skip)]
    made: Option<Instant>,
}

impl Notice {
    fn is_for(&self, approver: &str) -> bool {
        self.approver.to_lowercase() == approver.to_lowercase()
    }

    fn target(&self) -> NoticeTarget {
        NoticeTarget {
            approver: self.approver.clone(),
            account: self.account.clone(),
        }
    }
}

/// What an approved command gave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Outcome {
    /// The node's payload.
    Result(Value),
    /// Why it did not run or failed.
    Error(ErrorBody),
}

impl Approval {
    /// No decision yet.
    fn is_pending(&self) -> bool {
        self.decision.is_none()
    }

    /// Denied, or approved and its command's outcome known.
    fn is_over(&self) -> bool {
        match self.decision {
            None => false,
            Some(Decision::Denied) => true,
            Some(Decision::Approved) => self.outcome.is_some(),
        }
    }

    fn requested(&self) -> ApprovalRequested {
        ApprovalRequested {
            id: self.id.clone(),
            node: self.node.clone(),
            command: self.command.clone(),
            args: self.args.clone(),
            reason: self.reason.clone(),
            expires_at_ms: self.expires_at_ms,
            notify: Vec::new(),
        }
    }

    /// The current notice of `approver`, if any.
    fn current_notice(&self, approver: &str) -> Option<&Notice> {
        self.notices
            .iter()
            .find(|n| !n.superseded && n.is_for(approver))
    }

    fn outcome(&self) -> ApprovalOutcome {
        let (result, error) = match &self.outcome {
            Some(Outcome::Result(v)) => (Some(v.clone()), None),
            Some(Outcome::Error(e)) => (None, Some(e.clone())),
            None => (None, None),
        };
        ApprovalOutcome {
            id: self.id.clone(),
            decision: self.decision.unwrap_or(Decision::Denied),
            by: self.by.clone().unwrap_or_else(|| TIMEOUT_BY.to_string()),
            result,
            error,
            via: self.via.clone(),
        }
    }

    fn listing(&self) -> ApprovalListing {
        ApprovalListing {
            id: self.id.clone(),
            node: self.node.clone(),
            command: self.command.clone(),
            args: self.args.clone(),
            reason: self.reason.clone(),
            requested_at_ms: self.requested_at_ms,
            expires_at_ms: self.expires_at_ms,
            resolved: self.is_over(),
            decision: self.decision,
            by: self.by.clone(),
            decided_at_ms: self.decided_at_ms,
            via: self.via.clone(),
            notices: if self.is_over() {
                Vec::new()
            } else {
                self.notices
                    .iter()
                    .map(|n| ApprovalNotice {
                        approver: n.approver.clone(),
                        account: n.account.clone(),
                        active: !n.superseded,
                        room_id: n.room_id.clone(),
                        event_id: n.event_id.clone(),
                        delivered_at_ms: n.delivered_at_ms,
                    })
                    .collect()
            },
        }
    }
}

/// Why a decision was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
enum DecideError {
    /// No approval has that id (or it is older than the last [`KEEP_RESOLVED`] resolved).
    Unknown,
    /// Decided before, with this decision, by this approver.
    AlreadyDecided(Decision, String),
}

/// Every approval the broker knows: the pure part of the broker.
#[derive(Debug, Default)]
struct Book {
    /// Pending, or approved with the command running; by id.
    open: BTreeMap<String, Approval>,
    /// Over, oldest first; at most [`KEEP_RESOLVED`].
    resolved: VecDeque<Approval>,
}

/// What [`Book::load`] changed: to store again, announce, or delete.
#[derive(Debug, Default)]
struct LoadReport {
    /// Ids of approvals that ended while loading (expired, or interrupted while running).
    ended: Vec<String>,
    /// Ids of resolved approvals beyond [`KEEP_RESOLVED`], dropped.
    evicted: Vec<String>,
}

impl Book {
    /// A book of stored approvals, at wall time `now_ms`: pending ones past their expiry
    /// are denied by `timeout`, approved ones without an outcome end with `internal`.
    fn load(stored: Vec<Approval>, now_ms: u64) -> (Book, LoadReport) {
        let mut book = Book::default();
        let mut report = LoadReport::default();
        let mut resolved = Vec::new();
        for mut a in stored {
            if a.is_pending() && a.expires_at_ms <= now_ms {
                a.decision = Some(Decision::Denied);
                a.by = Some(TIMEOUT_BY.to_string());
                a.decided_at_ms = Some(now_ms);
                report.ended.push(a.id.clone());
            } else if a.decision == Some(Decision::Approved) && a.outcome.is_none() {
                a.outcome = Some(Outcome::Error(ErrorBody {
                    code: code::INTERNAL.to_string(),
                    message: "the gateway stopped before the command's result arrived; it may \
                              or may not have run"
                        .to_string(),
                }));
                report.ended.push(a.id.clone());
            }
            if a.is_over() {
                resolved.push(a);
            } else {
                book.open.insert(a.id.clone(), a);
            }
        }
        resolved.sort_by(|a, b| (a.decided_at_ms, &a.id).cmp(&(b.decided_at_ms, &b.id)));
        for a in resolved {
            report.evicted.extend(book.push_resolved(a));
        }
        (book, report)
    }

    fn contains(&self, id: &str) -> bool {
        self.open.contains_key(id) || self.resolved.iter().any(|a| a.id == id)
    }

    fn get(&self, id: &str) -> Option<&Approval> {
        self.open
            .get(id)
            .or_else(|| self.resolved.iter().find(|a| a.id == id))
    }

    /// The pending approval whose notice to `approver` through `account` is message
    /// `event_id`.
    fn id_of_notice(&self, account: &str, approver: &str, event_id: &str) -> Option<String> {
        self.open
            .values()
            .find(|a| {
                a.notices.iter().any(|n| {
                    n.account == account
                        && n.is_for(approver)
                        && n.event_id.as_deref() == Some(event_id)
                })
            })
            .map(|a| a.id.clone())
    }

    fn insert(&mut self, approval: Approval) {
        self.open.insert(approval.id.clone(), approval);
    }

    /// Takes the first decision on `id`; every later one is refused.
    fn decide(
        &mut self,
        id: &str,
        decision: Decision,
        by: &str,
        now_ms: u64,
    ) -> Result<&Approval, DecideError> {
        let decided = |a: &Approval| {
            DecideError::AlreadyDecided(
                a.decision.unwrap_or(Decision::Denied),
                a.by.clone().unwrap_or_default(),
            )
        };
        match self.open.get_mut(id) {
            Some(a) if a.is_pending() => {
                a.decision = Some(decision);
                a.by = Some(by.to_string());
                a.decided_at_ms = Some(now_ms);
                Ok(a)
            }
            Some(a) => Err(decided(a)),
            None => match self.resolved.iter().find(|a| a.id == id) {
                Some(a) => Err(decided(a)),
                None => Err(DecideError::Unknown),
            },
        }
    }

    /// Records what approval `id`'s command gave.
    fn set_outcome(&mut self, id: &str, outcome: Outcome) -> Option<&Approval> {
        let a = self.open.get_mut(id)?;
        if a.decision != Some(Decision::Approved) || a.outcome.is_some() {
            return None;
        }
        a.outcome = Some(outcome);
        Some(a)
    }

    /// Moves approval `id`, now over, to the resolved ones; returns the ids dropped to keep
    /// [`KEEP_RESOLVED`].
    fn close(&mut self, id: &str) -> Vec<String> {
        match self.open.remove(id) {
            Some(a) => self.push_resolved(a),
            None => Vec::new(),
        }
    }

    fn push_resolved(&mut self, approval: Approval) -> Vec<String> {
        self.resolved.push_back(approval);
        let mut evicted = Vec::new();
        while self.resolved.len() > KEEP_RESOLVED {
            if let Some(old) = self.resolved.pop_front() {
                evicted.push(old.id);
            }
        }
        evicted
    }

    fn pending(&self) -> usize {
        self.open.values().filter(|a| a.is_pending()).count()
    }

    /// One page of `approvals.list`: at most `limit` entries after `cursor` (from the
    /// first without), in listing order (see [`listing_order`]); `next` when more follow.
    fn page(&self, cursor: Option<&ApprovalCursor>, limit: usize) -> ApprovalPage {
        let position = |section, at_ms, a: &Approval| ApprovalCursor {
            section,
            at_ms,
            id: a.id.clone(),
        };
        let open = self
            .open
            .values()
            .map(|a| (position(ListSection::Open, a.requested_at_ms, a), a));
        let resolved = self.resolved.iter().map(|a| {
            let at_ms = a.decided_at_ms.unwrap_or_default();
            (position(ListSection::Resolved, at_ms, a), a)
        });
        let mut entries: Vec<(ApprovalCursor, &Approval)> = open
            .chain(resolved)
            .filter(|(at, _)| cursor.is_none_or(|c| listing_order(at, c) == Ordering::Greater))
            .collect();
        entries.sort_by(|a, b| listing_order(&a.0, &b.0));
        let more = entries.len() > limit;
        entries.truncate(limit);
        let next = if more {
            entries.last().map(|(at, _)| at.clone())
        } else {
            None
        };
        ApprovalPage {
            approvals: entries.into_iter().map(|(_, a)| a.listing()).collect(),
            next,
        }
    }
}

/// The order of `approvals.list`: open approvals by (`requested_at_ms`, id), then resolved
/// ones by (`decided_at_ms`, id) descending. A total order on positions, so a cursor
/// (the position of a page's last entry) says exactly which entries come after it.
fn listing_order(a: &ApprovalCursor, b: &ApprovalCursor) -> Ordering {
    match (a.section, b.section) {
        (ListSection::Open, ListSection::Open) => (a.at_ms, &a.id).cmp(&(b.at_ms, &b.id)),
        (ListSection::Resolved, ListSection::Resolved) => (b.at_ms, &b.id).cmp(&(a.at_ms, &a.id)),
        (ListSection::Open, ListSection::Resolved) => Ordering::Less,
        (ListSection::Resolved, ListSection::Open) => Ordering::Greater,
    }
}

/// The directory of approval files.
#[derive(Debug, Clone)]
struct Store {
    dir: PathBuf,
}

impl Store {
    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Creates the directory (0700) if needed.
    fn ensure_dir(&self) -> io::Result<()> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
    }

    /// Writes `approval` atomically: a 0600 temporary file, synced, renamed over the old one.
    fn save(&self, approval: &Approval) -> io::Result<()> {
        self.ensure_dir()?;
        let bytes = serde_json::to_vec_pretty(approval).map_err(io::Error::other)?;
        let tmp = self.dir.join(format!(".{}.json.tmp", approval.id));
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // `mode` applies only to a new file; a leftover one may have been created otherwise.
        file.set_permissions(Permissions::from_mode(0o600))?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, self.path(&approval.id))?;
        // Make the rename itself durable; best effort (not every filesystem allows it).
        if let Ok(dir) = File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    fn remove(&self, id: &str) -> io::Result<()> {
        match fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every readable approval file; an unreadable one is skipped with a warning (and left
    /// in place for a person to look at), leftover temporary files are removed.
    fn load(&self) -> io::Result<Vec<Approval>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut approvals = Vec::new();
        for entry in entries {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = fs::remove_file(&path);
                continue;
            }
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            match read_approval(&path) {
                Ok(a) if a.id == id && is_valid_id(id) => approvals.push(a),
                Ok(a) => {
                    warn!(path = %path.display(), id = %a.id,
                        "Skipping an approval file whose name does not match its id.");
                }
                Err(Unreadable::TooLarge(bytes)) => {
                    warn!(path = %path.display(), bytes, limit = MAX_FILE_BYTES,
                        "Skipping an approval file larger than the limit; it is left in place.");
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e,
                        "Skipping an unreadable approval file.");
                }
            }
        }
        Ok(approvals)
    }
}

/// Why an approval file was not read back.
#[derive(Debug, thiserror::Error)]
enum Unreadable {
    /// Over [`MAX_FILE_BYTES`]: this many bytes.
    #[error("{0} bytes, over the limit of {MAX_FILE_BYTES}")]
    TooLarge(u64),
    /// A directory, a FIFO, a device…
    #[error("not a regular file")]
    NotAFile,
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("not an approval: {0}")]
    Json(#[from] serde_json::Error),
}

/// Reads one approval file, never more than [`MAX_FILE_BYTES`] of it: the size is checked
/// on the metadata first, and the read stops past the limit should the file grow meanwhile.
fn read_approval(path: &Path) -> Result<Approval, Unreadable> {
    let meta = fs::metadata(path)?;
    if !meta.is_file() {
        return Err(Unreadable::NotAFile);
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(Unreadable::TooLarge(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    File::open(path)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(Unreadable::TooLarge(bytes.len() as u64));
    }
    Ok(serde_json::from_slice(&bytes)?)
}

/// The approvals broker actor.
pub struct ApprovalsActor;

/// The broker's arguments.
pub struct ApprovalsArgs {
    /// Its settings, the hub, the registry, and the client it points at itself.
    pub gateway: GatewayState,
    /// `actor` span of this incarnation.
    pub span: tracing::Span,
}

/// A requester waiting for the outcome; told if the broker stops first.
struct Waiter {
    id: String,
    reply: Option<ReplyTo>,
}

impl Waiter {
    fn answer(mut self, outcome: &ApprovalOutcome) {
        if let Some(reply) = self.reply.take() {
            reply.ok(to_value(outcome));
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(reply) = self.reply.take() {
            let message = format!(
                "the approvals broker stopped; approval {} is still on record (see approvals.list)",
                self.id
            );
            reply.err(code::INTERNAL, message);
        }
    }
}

/// The broker's state.
pub struct ApprovalsState {
    gateway: GatewayState,
    settings: ApprovalsSettings,
    store: Store,
    book: Book,
    /// Requesters waiting for the outcome, by approval id.
    waiters: HashMap<String, Waiter>,
    /// Expiry timers of pending approvals, by id.
    timers: HashMap<String, Timer<ApprovalsMsg>>,
    /// Tasks awaiting a node's answer, by approval id.
    running: HashMap<String, AbortOnDrop>,
    /// Since when each current notice (by approval id and lower-cased approver) could
    /// have been handed over: its account cannot notify and another one could.
    waiting: HashMap<(String, String), Instant>,
    /// The periodic [`ApprovalsMsg::Sweep`].
    sweep: Option<AbortOnDrop>,
    span: tracing::Span,
}

impl Actor for ApprovalsActor {
    type Msg = ApprovalsMsg;
    type State = ApprovalsState;
    type Arguments = ApprovalsArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ApprovalsMsg>,
        args: ApprovalsArgs,
    ) -> Result<ApprovalsState, ActorProcessingErr> {
        let ApprovalsArgs { gateway, span } = args;
        let settings = gateway
            .approvals_settings()
            .cloned()
            .ok_or("the approvals broker started without approvals settings")?;
        let store = Store {
            dir: settings.dir.clone(),
        };
        let mut state = ApprovalsState {
            gateway,
            settings,
            store,
            book: Book::default(),
            waiters: HashMap::new(),
            timers: HashMap::new(),
            running: HashMap::new(),
            waiting: HashMap::new(),
            sweep: None,
            span,
        };
        let span = state.span.clone();
        span.in_scope(|| state.load(&myself));
        let every = sweep_period(state.gateway.approval_routing().renotify_after);
        state.sweep = Some(myself.send_interval(every, || ApprovalsMsg::Sweep).into());
        state.gateway.approvals_client().set(Some(myself));
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<ApprovalsMsg>,
        msg: ApprovalsMsg,
        state: &mut ApprovalsState,
    ) -> Result<(), ActorProcessingErr> {
        let span = state.span.clone();
        span.in_scope(|| state.on_message(&myself, msg));
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<ApprovalsMsg>,
        state: &mut ApprovalsState,
    ) -> Result<(), ActorProcessingErr> {
        let client = state.gateway.approvals_client();
        if client
            .current()
            .is_some_and(|a| a.get_id() == myself.get_id())
        {
            client.set(None);
        }
        ::metrics::gauge!(metrics::APPROVALS_PENDING).set(0.0);
        Ok(())
    }
}

impl ApprovalsState {
    /// Reads the stored approvals back, ends those that ended while the broker was down,
    /// and arms a timer for each pending one.
    fn load(&mut self, myself: &ActorRef<ApprovalsMsg>) {
        let stored = match self.store.load() {
            Ok(stored) => stored,
            Err(e) => {
                error!(dir = %self.store.dir.display(), error = %e,
                    "Cannot read the stored approvals; starting without them.");
                Vec::new()
            }
        };
        let now = now_ms();
        let (book, report) = Book::load(stored, now);
        self.book = book;
        let loaded = Instant::now();
        for notice in self
            .book
            .open
            .values_mut()
            .flat_map(|a| a.notices.iter_mut())
        {
            notice.made = Some(loaded);
        }
        for id in &report.evicted {
            self.remove_file(id);
        }
        for id in &report.ended {
            if let Some(a) = self.book.get(id).cloned() {
                self.save(&a);
                if a.by.as_deref() == Some(TIMEOUT_BY) {
                    ::metrics::counter!(metrics::APPROVALS_TOTAL, "decision" => TIMEOUT_BY)
                        .increment(1);
                }
                info!(id = %a.id, by = a.by.as_deref().unwrap_or_default(),
                    "Approval ended while the gateway was down.");
                self.gateway
                    .hub()
                    .publish(event::APPROVAL_RESOLVED, to_value(&a.outcome()));
            }
        }
        let pending: Vec<(String, u64)> = self
            .book
            .open
            .values()
            .filter(|a| a.is_pending())
            .map(|a| (a.id.clone(), a.expires_at_ms))
            .collect();
        for (id, expires_at_ms) in pending {
            let left = Duration::from_millis(expires_at_ms.saturating_sub(now));
            self.arm(myself, &id, left);
        }
        info!(
            open = self.book.open.len(),
            pending = self.book.pending(),
            resolved = self.book.resolved.len(),
            "Approvals loaded."
        );
        self.gauge();
        self.deny_revoked(myself);
        // Approvals stored before notices existed, or whose approvers changed: routed now.
        self.sweep();
    }

    /// Whether `requester` is an operator the gateway no longer admits under that name.
    fn is_revoked(&self, requester: &str) -> bool {
        requester.strip_prefix("operator:").is_some_and(|name| {
            !self
                .gateway
                .principals()
                .operator_names()
                .any(|op| op == name)
        })
    }

    /// Denies (by [`REVOKED_BY`]) every pending approval whose requester is revoked.
    fn deny_revoked(&mut self, myself: &ActorRef<ApprovalsMsg>) {
        let revoked: Vec<String> = self
            .book
            .open
            .values()
            .filter(|a| a.is_pending() && self.is_revoked(&a.requester))
            .map(|a| a.id.clone())
            .collect();
        for id in revoked {
            if self
                .book
                .decide(&id, Decision::Denied, REVOKED_BY, now_ms())
                .is_ok()
            {
                info!(id = %id, "Approval denied: its requester is no longer configured.");
                self.decided(myself, &id);
            }
        }
    }

    fn on_message(&mut self, myself: &ActorRef<ApprovalsMsg>, msg: ApprovalsMsg) {
        match msg {
            ApprovalsMsg::Request {
                params,
                requester,
                reply,
            } => self.request(myself, params, requester, reply),
            ApprovalsMsg::Resolve {
                params,
                account,
                reply,
            } => self.resolve(myself, params, account, reply),
            ApprovalsMsg::List { params, reply } => {
                let page = self.book.page(params.cursor.as_ref(), params.limit);
                reply.ok(to_value(&page));
            }
            ApprovalsMsg::Expire { id } => {
                self.timers.remove(&id);
                if self
                    .book
                    .decide(&id, Decision::Denied, TIMEOUT_BY, now_ms())
                    .is_ok()
                {
                    info!(id = %id, "Approval timed out; denied.");
                    self.decided(myself, &id);
                }
            }
            ApprovalsMsg::PrincipalsChanged => self.deny_revoked(myself),
            ApprovalsMsg::Notified {
                params,
                account,
                reply,
            } => self.notified(params, account, reply),
            ApprovalsMsg::Sweep => self.sweep(),
            ApprovalsMsg::InvokeDone { id, result } => {
                self.running.remove(&id);
                let outcome = match result {
                    Ok(payload) => Outcome::Result(payload),
                    Err(error) => Outcome::Error(error),
                };
                if let Some(a) = self.book.set_outcome(&id, outcome).cloned() {
                    self.save(&a);
                    self.finish(&id);
                }
            }
        }
    }

    /// `approvals.request`: a new pending approval, announced to the approvers.
    fn request(
        &mut self,
        myself: &ActorRef<ApprovalsMsg>,
        params: ApprovalRequestParams,
        requester: String,
        reply: ReplyTo,
    ) {
        // A request read from a session just before its credential was revoked.
        if self.is_revoked(&requester) {
            let message = format!("{requester} is no longer configured");
            return reply.err(code::FORBIDDEN, message);
        }
        let open = self.book.open.len();
        let mine = self
            .book
            .open
            .values()
            .filter(|a| a.requester == requester)
            .count();
        if mine >= self.settings.max_open_per_requester {
            let message = format!(
                "{mine} approvals of {requester} are open, the cap per requester ({}); \
                 try again once some are decided",
                self.settings.max_open_per_requester
            );
            return reply.err(code::BUSY, message);
        }
        let routing = self.gateway.approval_routing();
        if let Some(account) = &params.account
            && routing.approvers.get(account).is_none_or(Vec::is_empty)
        {
            let message = format!("account {account:?} has no approval handler with approvers");
            return reply.err(code::UNKNOWN_ACCOUNT, message);
        }
        if let Err((refusal, message)) = self.settings.check_request(&params, open) {
            if refusal == code::BUSY {
                debug!(
                    open,
                    cap = self.settings.max_open,
                    "Refusing an approval request: the cap on open approvals is reached."
                );
            }
            return reply.err(refusal, message);
        }
        match self.gateway.registry().lookup(&params.node) {
            Lookup::Unknown => {
                let message = format!("no node {:?} has connected", params.node);
                return reply.err(code::UNKNOWN_NODE, message);
            }
            Lookup::Online { commands, .. }
                if !commands.iter().any(|c| c.name == params.command) =>
            {
                let message = format!("node {:?} has no command {:?}", params.node, params.command);
                return reply.err(code::UNKNOWN_COMMAND, message);
            }
            // An offline node may be back by the time the approval is decided.
            _ => {}
        }
        let id = loop {
            let id = new_id();
            if !self.book.contains(&id) {
                break id;
            }
        };
        let timeout = params
            .timeout_s
            .map_or(self.settings.default_timeout, Duration::from_secs);
        let now = now_ms();
        let mut approval = Approval {
            id: id.clone(),
            node: params.node,
            command: params.command,
            args: params.args,
            reason: params.reason,
            requester,
            requested_at_ms: now,
            expires_at_ms: now.saturating_add(timeout.as_millis() as u64),
            decision: None,
            by: None,
            decided_at_ms: None,
            outcome: None,
            account: params.account,
            notices: Vec::new(),
            via: None,
        };
        let ready = |a: &str| self.gateway.can_notify(a);
        let targets = assign_missing(&mut approval, &routing, &ready, now);
        if let Err(e) = self.store.save(&approval) {
            error!(dir = %self.store.dir.display(), error = %e,
                "Cannot store an approval; refusing the request.");
            return reply.err(code::INTERNAL, format!("cannot store the approval: {e}"));
        }
        info!(id = %id, node = %approval.node, command = %approval.command,
            timeout_s = timeout.as_secs(), notify = ?targets, "Approval requested.");
        let mut requested = approval.requested();
        requested.notify = targets;
        self.book.insert(approval);
        self.arm(myself, &id, timeout);
        self.waiters.insert(
            id.clone(),
            Waiter {
                id,
                reply: Some(reply),
            },
        );
        self.gateway
            .hub()
            .publish(event::APPROVAL_REQUESTED, to_value(&requested));
        self.gauge();
    }

    /// `approvals.resolve`: the first decision of a listed approver, made where that
    /// approver was asked, wins.
    fn resolve(
        &mut self,
        myself: &ActorRef<ApprovalsMsg>,
        params: ApprovalResolveParams,
        account: Option<String>,
        reply: ReplyTo,
    ) {
        // A revoked requester's approval is denied before anyone can approve it.
        self.deny_revoked(myself);
        let by = params.by.clone();
        let Some(account) = account.filter(|a| self.gateway.approval_routing().lists(a, &by))
        else {
            let message = format!("{by} is not an approver of this handler's account");
            return reply.err(code::FORBIDDEN, message);
        };
        let id = match params.id.clone().or_else(|| {
            let event = params.relates_to.as_deref()?;
            self.book.id_of_notice(&account, &by, event)
        }) {
            Some(id) => id,
            None => {
                let event = params.relates_to.unwrap_or_default();
                let message = format!("event {event} is not an approval request {by} was sent");
                return reply.err(code::UNKNOWN_APPROVAL, message);
            }
        };
        let decision = match params.decision {
            Verdict::Approve => Decision::Approved,
            Verdict::Deny => Decision::Denied,
        };
        if let Some(a) = self.book.open.get(&id).filter(|a| a.is_pending())
            && let Err(why) = asked_there(a, &account, &params)
        {
            debug!(id = %id, by = %by, room = %params.room_id, "{why}");
            return reply.err(code::FORBIDDEN, why);
        }
        let via = DecidedVia {
            account,
            room_id: params.room_id,
            event_id: params.event_id,
        };
        match self.book.decide(&id, decision, &by, now_ms()) {
            Ok(_) => {}
            Err(DecideError::Unknown) => {
                return reply.err(code::UNKNOWN_APPROVAL, format!("no approval {id:?}"));
            }
            Err(DecideError::AlreadyDecided(earlier, who)) => {
                let message = format!("approval {id} was already {} by {who}", earlier.as_str());
                return reply.err(code::ALREADY_RESOLVED, message);
            }
        }
        info!(id = %id, decision = decision.as_str(), by = %by, account = %via.account,
            room = %via.room_id, event = %via.event_id, "Approval decided.");
        if let Some(a) = self.book.open.get_mut(&id) {
            a.via = Some(via);
        }
        reply.ok(to_value(&ApprovalResolved {
            id: id.clone(),
            decision,
        }));
        self.decided(myself, &id);
    }

    /// `approvals.notified`: the handler of `account` delivered `approver`'s notification.
    fn notified(
        &mut self,
        params: ApprovalNotifiedParams,
        account: Option<String>,
        reply: ReplyTo,
    ) {
        let ApprovalNotifiedParams {
            id,
            approver,
            room_id,
            event_id,
        } = params;
        let account = account.unwrap_or_default();
        let Some(a) = self.book.open.get_mut(&id) else {
            // Decided (or gone) meanwhile: nothing left to record.
            return reply.ok(serde_json::json!({ "id": id, "recorded": false }));
        };
        // The newest notice of this approver through this account (a superseded one may
        // still have been delivered, and a decision there counts).
        let Some(notice) = a
            .notices
            .iter_mut()
            .rev()
            .find(|n| n.account == account && n.is_for(&approver))
        else {
            let message = format!(
                "approval {id} was not to be sent to {approver} through account {account:?}"
            );
            return reply.err(code::FORBIDDEN, message);
        };
        if notice.event_id.is_none() {
            notice.room_id = Some(room_id);
            notice.event_id = Some(event_id);
            notice.delivered_at_ms = Some(now_ms());
            let a = a.clone();
            self.save(&a);
            info!(id = %id, approver = %approver, account = %account, "Approver notified.");
        }
        reply.ok(serde_json::json!({ "id": id, "recorded": true }));
    }

    /// Retires notices whose account no longer lists their approver (a reload), hands
    /// over once those whose account could not notify for `renotify_after` while another
    /// could, and gives an account to every approver left without one; stores and
    /// announces (`approval.notify`) what changed.
    fn sweep(&mut self) {
        let routing = self.gateway.approval_routing();
        let now = now_ms();
        let gateway = self.gateway.clone();
        let ready = |a: &str| gateway.can_notify(a);
        let mut seen = std::collections::HashSet::new();
        let mut changed = Vec::new();
        for a in self.book.open.values_mut().filter(|a| a.is_pending()) {
            let mut moved = retire_unlisted(a, &routing);
            let mut targets = hand_over(a, &routing, &ready, &mut self.waiting, &mut seen, now);
            targets.extend(assign_missing(a, &routing, &ready, now));
            moved |= !targets.is_empty();
            if moved {
                changed.push((a.clone(), targets));
            }
        }
        self.waiting.retain(|key, _| seen.contains(key));
        for (a, targets) in changed {
            self.save(&a);
            if targets.is_empty() {
                continue;
            }
            info!(id = %a.id, notify = ?targets, "Approval: approvers to notify through another account.");
            let mut payload = a.requested();
            payload.notify = targets;
            self.gateway
                .hub()
                .publish(event::APPROVAL_NOTIFY, to_value(&payload));
        }
    }

    /// After the first decision on `id`: store it; run the command or finish.
    fn decided(&mut self, myself: &ActorRef<ApprovalsMsg>, id: &str) {
        self.timers.remove(id);
        let Some(a) = self.book.get(id).cloned() else {
            return;
        };
        let label = match (a.decision, a.by.as_deref()) {
            (Some(Decision::Denied), Some(TIMEOUT_BY)) => TIMEOUT_BY,
            (Some(d), _) => d.as_str(),
            (None, _) => return,
        };
        ::metrics::counter!(metrics::APPROVALS_TOTAL, "decision" => label).increment(1);
        self.save(&a);
        self.gauge();
        if a.decision == Some(Decision::Approved) {
            self.run(myself, a);
        } else {
            self.finish(id);
        }
    }

    /// Runs approved `a`'s command on its node, like `nodes.invoke`.
    fn run(&mut self, myself: &ActorRef<ApprovalsMsg>, a: Approval) {
        let timeout = Duration::from_millis(DEFAULT_INVOKE_TIMEOUT_MS);
        let (tx, rx) = oneshot::channel();
        let dispatched = dispatch_invoke(
            &self.gateway,
            &a.node,
            a.command.clone(),
            a.args.clone(),
            timeout,
            InvokeReply::Oneshot(tx),
            Some(&a.id),
        );
        if let Err((code, message)) = dispatched {
            debug!(id = %a.id, code, "Approved command could not be sent to its node.");
            // Through the mailbox, so that every outcome takes the same path.
            let _ = myself.send_message(ApprovalsMsg::InvokeDone {
                id: a.id,
                result: Err(ErrorBody {
                    code: code.to_string(),
                    message,
                }),
            });
            return;
        }
        let me = myself.clone();
        let id = a.id.clone();
        let wait = async move {
            let result = match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(result)) => result,
                // The node's session forgot the call (its own timeout), or time is up.
                Ok(Err(_)) | Err(_) => Err(ErrorBody {
                    code: code::TIMEOUT.to_string(),
                    message: "the node did not answer in time".to_string(),
                }),
            };
            let _ = me.send_message(ApprovalsMsg::InvokeDone { id, result });
        };
        let (me, id) = (myself.clone(), a.id.clone());
        // A task that returns has sent `InvokeDone`; one that panics has not.
        let report = move |ended: task::Ended| {
            if ended.panicked() {
                let result = Err(ErrorBody {
                    code: code::INTERNAL.to_string(),
                    message: ended.to_string(),
                });
                let _ = me.send_message(ApprovalsMsg::InvokeDone { id, result });
            }
        };
        let task = task::spawn("invoke", self.span.clone(), wait, report);
        self.running.insert(a.id, task);
    }

    /// Approval `id` is over: keep it among the resolved, answer the requester, tell the
    /// subscribed sessions.
    fn finish(&mut self, id: &str) {
        for old in self.book.close(id) {
            self.remove_file(&old);
        }
        let Some(outcome) = self.book.get(id).map(Approval::outcome) else {
            return;
        };
        if let Some(waiter) = self.waiters.remove(id) {
            waiter.answer(&outcome);
        }
        self.gateway
            .hub()
            .publish(event::APPROVAL_RESOLVED, to_value(&outcome));
        self.gauge();
    }

    fn arm(&mut self, myself: &ActorRef<ApprovalsMsg>, id: &str, after: Duration) {
        let expired = id.to_string();
        let timer = myself.send_after(after, move || ApprovalsMsg::Expire { id: expired });
        self.timers.insert(id.to_string(), timer.into());
    }

    /// Stores `a`; a failure is logged, and the approval goes on in memory.
    fn save(&self, a: &Approval) {
        if let Err(e) = self.store.save(a) {
            error!(id = %a.id, dir = %self.store.dir.display(), error = %e,
                "Cannot store an approval; a restart would lose this change.");
        }
    }

    fn remove_file(&self, id: &str) {
        if let Err(e) = self.store.remove(id) {
            warn!(id = %id, error = %e, "Cannot remove an old approval file.");
        }
    }

    fn gauge(&self) {
        ::metrics::gauge!(metrics::APPROVALS_PENDING).set(self.book.pending() as f64);
    }
}

/// Notices one approval keeps at most: past it, no approver of it is handed over again
/// (accounts that keep going down in turn; the notices made so far stand).
const MAX_NOTICES: usize = 64;

/// How often the broker sweeps (see [`ApprovalsMsg::Sweep`]): every second, or four
/// times per `renotify_after` when that is shorter (at least every 50 ms).
fn sweep_period(renotify_after: Duration) -> Duration {
    (renotify_after / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// Gives every approver of pending `a` (those of its pinned account, or all) that has no
/// current notice one, through the account [`ApprovalRouting::route`] picks; returns
/// them.
fn assign_missing(
    a: &mut Approval,
    routing: &ApprovalRouting,
    ready: &dyn Fn(&str) -> bool,
    now_ms: u64,
) -> Vec<NoticeTarget> {
    let mut added = Vec::new();
    for approver in routing.approvers_for(a.account.as_deref()) {
        if a.current_notice(&approver).is_some() {
            continue;
        }
        if let Some(account) = routing.route(a.account.as_deref(), &approver, ready, None) {
            let notice = Notice {
                approver: routing.spelling(&account, &approver),
                account,
                assigned_at_ms: now_ms,
                superseded: false,
                handed_over: false,
                room_id: None,
                event_id: None,
                delivered_at_ms: None,
                made: Some(Instant::now()),
            };
            added.push(notice.target());
            a.notices.push(notice);
        }
    }
    added
}

/// Retires (supersedes) each current notice of `a` whose account no longer lists its
/// approver, or is not the account `a` is pinned to; [`assign_missing`] then gives the
/// approver another. Returns whether any was retired.
fn retire_unlisted(a: &mut Approval, routing: &ApprovalRouting) -> bool {
    let mut retired = false;
    for notice in a.notices.iter_mut().filter(|n| !n.superseded) {
        let pinned_elsewhere = a.account.as_ref().is_some_and(|p| *p != notice.account);
        if pinned_elsewhere || !routing.lists(&notice.account, &notice.approver) {
            notice.superseded = true;
            retired = true;
        }
    }
    retired
}

/// Hands each current notice of pending `a` over to another ready account that lists its
/// approver, once per approver, when its own account has not been able to notify for
/// `renotify_after` while such another account was ready (a shared outage moves nothing);
/// returns the new ones. `waiting` keeps since when each notice was eligible (`seen` the
/// ones that still are); an approval pinned to one account is never handed over.
fn hand_over(
    a: &mut Approval,
    routing: &ApprovalRouting,
    ready: &dyn Fn(&str) -> bool,
    waiting: &mut HashMap<(String, String), Instant>,
    seen: &mut std::collections::HashSet<(String, String)>,
    now_ms: u64,
) -> Vec<NoticeTarget> {
    if a.account.is_some() || a.notices.len() >= MAX_NOTICES {
        return Vec::new();
    }
    // Once per approver means one delivered hand-over: one that never reached the
    // approver (its account went down too) may be handed on again.
    let handed: std::collections::HashSet<String> = a
        .notices
        .iter()
        .filter(|n| n.handed_over && n.event_id.is_some())
        .map(|n| n.approver.to_lowercase())
        .collect();
    let mut added = Vec::new();
    let mut fresh = Vec::new();
    for notice in a.notices.iter_mut().filter(|n| !n.superseded) {
        let approver = notice.approver.to_lowercase();
        if handed.contains(&approver) || ready(&notice.account) {
            continue;
        }
        let Some(account) = routing.route(None, &notice.approver, ready, Some(&notice.account))
        else {
            continue;
        };
        let key = (a.id.clone(), approver);
        let since = *waiting.entry(key.clone()).or_insert_with(Instant::now);
        seen.insert(key);
        let since = notice.made.map_or(since, |made| made.max(since));
        if since.elapsed() < routing.renotify_after {
            continue;
        }
        notice.superseded = true;
        let next = Notice {
            approver: routing.spelling(&account, &notice.approver),
            account,
            assigned_at_ms: now_ms,
            superseded: false,
            handed_over: true,
            room_id: None,
            event_id: None,
            delivered_at_ms: None,
            made: Some(Instant::now()),
        };
        added.push(next.target());
        fresh.push(next);
    }
    a.notices.extend(fresh);
    added
}

/// Whether `params` (a decision through `account`) was made where its approver was
/// asked: in the room of a delivered notice of theirs through that account, and, when it
/// relates to an event, relating to that notice's message. The error says why not.
fn asked_there(a: &Approval, account: &str, params: &ApprovalResolveParams) -> Result<(), String> {
    let asked: Vec<&Notice> = a
        .notices
        .iter()
        .filter(|n| n.account == account && n.is_for(&params.by) && n.event_id.is_some())
        .collect();
    if asked.is_empty() {
        return Err(format!(
            "{} was not asked about approval {} through account {account:?}",
            params.by, a.id
        ));
    }
    let here = asked.iter().any(|n| {
        n.room_id.as_deref() == Some(params.room_id.as_str())
            && params
                .relates_to
                .as_deref()
                .is_none_or(|e| n.event_id.as_deref() == Some(e))
    });
    if here {
        Ok(())
    } else {
        Err(format!(
            "a decision on approval {} counts only in the room where {} was asked, on its \
             request message",
            a.id, params.by
        ))
    }
}

/// Bytes of `value` as compact JSON, counted without building the text.
fn json_len(value: &Value) -> usize {
    struct Count(usize);
    impl Write for Count {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a `Value` into a sink that never fails cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// JSON of a wire type; these serialize infallibly.
fn to_value<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use serde_json::json;

    use super::super::invoke::{Invoke, NodeMsg};

    use super::*;

    /// A scratch directory removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "warden-approvals-{name}-{}-{}",
                std::process::id(),
                new_id()
            ));
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn approval(id: &str, requested_at_ms: u64, expires_at_ms: u64) -> Approval {
        Approval {
            id: id.to_string(),
            node: "box".to_string(),
            command: "disk".to_string(),
            args: json!(["-h"]),
            reason: "why not".to_string(),
            requester: "operator:default".to_string(),
            requested_at_ms,
            expires_at_ms,
            decision: None,
            by: None,
            decided_at_ms: None,
            outcome: None,
            account: None,
            notices: Vec::new(),
            via: None,
        }
    }

    /// `approver`, told about `id` through `account` in room `!dm-<account>:x` by event
    /// `$req-<id>-<account>`, as its handler reports it.
    fn notified(id: &str, approver: &str, account: &str, reply: ReplyTo) -> ApprovalsMsg {
        ApprovalsMsg::Notified {
            params: ApprovalNotifiedParams {
                id: id.into(),
                approver: approver.into(),
                room_id: format!("!dm-{account}:x"),
                event_id: format!("$req-{id}-{account}"),
            },
            account: Some(account.into()),
            reply,
        }
    }

    /// A decision by `by` on `id`, written in room `room` through `account`'s handler.
    fn decision(
        id: &str,
        decision: Verdict,
        by: &str,
        account: &str,
        room: &str,
        reply: ReplyTo,
    ) -> ApprovalsMsg {
        ApprovalsMsg::Resolve {
            params: ApprovalResolveParams {
                id: Some(id.into()),
                decision,
                by: by.into(),
                room_id: room.into(),
                event_id: format!("$answer-{id}"),
                relates_to: None,
            },
            account: Some(account.into()),
            reply,
        }
    }

    #[test]
    fn ids_are_eight_random_lowercase_alphanumerics() {
        let ids: HashSet<String> = (0..1000).map(|_| new_id()).collect();
        assert_eq!(ids.len(), 1000, "ids repeat");
        for id in &ids {
            assert!(is_valid_id(id), "{id}");
        }
        let all: HashSet<char> = ids.iter().flat_map(|id| id.chars()).collect();
        assert!(
            all.iter().any(char::is_ascii_digit) && all.len() > 30,
            "{all:?}"
        );
        for bad in ["abc", "ABCDEFGH", "abcd-123", "abcdefghi", "../../x"] {
            assert!(!is_valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn the_first_decision_wins() {
        let mut book = Book::default();
        book.insert(approval("aaaaaaaa", 1, 1000));
        assert_eq!(book.pending(), 1);
        let first = book
            .decide("aaaaaaaa", Decision::Denied, "@a:x", 10)
            .expect("first");
        assert_eq!(first.by.as_deref(), Some("@a:x"));
        assert_eq!(book.pending(), 0);
        for (d, by) in [(Decision::Approved, "@b:x"), (Decision::Denied, TIMEOUT_BY)] {
            assert_eq!(
                book.decide("aaaaaaaa", d, by, 11).map(|a| a.id.clone()),
                Err(DecideError::AlreadyDecided(Decision::Denied, "@a:x".into()))
            );
        }
        assert!(book.close("aaaaaaaa").is_empty());
        assert_eq!(
            book.decide("aaaaaaaa", Decision::Approved, "@b:x", 12)
                .map(|a| a.id.clone()),
            Err(DecideError::AlreadyDecided(Decision::Denied, "@a:x".into()))
        );
        assert_eq!(
            book.decide("zzzzzzzz", Decision::Approved, "@b:x", 12)
                .map(|a| a.id.clone()),
            Err(DecideError::Unknown)
        );

        // Approved: stays open until its outcome arrives, and takes one outcome only.
        book.insert(approval("bbbbbbbb", 2, 1000));
        book.decide("bbbbbbbb", Decision::Approved, "@a:x", 20)
            .expect("approve");
        assert!(!book.get("bbbbbbbb").expect("open").is_over());
        assert!(
            book.set_outcome("bbbbbbbb", Outcome::Result(json!({"exit_code": 0})))
                .is_some()
        );
        assert!(
            book.set_outcome("bbbbbbbb", Outcome::Result(json!(null)))
                .is_none()
        );
        book.close("bbbbbbbb");
        let out = book.get("bbbbbbbb").expect("resolved").outcome();
        assert_eq!(
            (out.decision, out.result),
            (Decision::Approved, Some(json!({"exit_code": 0})))
        );
        let list = book.page(None, 200).approvals;
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].id, "bbbbbbbb", "newest resolved first");
        assert!(list.iter().all(|l| l.resolved));
    }

    #[test]
    fn only_the_last_resolved_ones_are_kept() {
        let mut book = Book::default();
        let mut evicted = Vec::new();
        for i in 0..KEEP_RESOLVED + 3 {
            let id = format!("{i:08}");
            book.insert(approval(&id, i as u64, 1000));
            book.decide(&id, Decision::Denied, "@a:x", i as u64)
                .expect("decide");
            evicted.extend(book.close(&id));
        }
        assert_eq!(evicted, ["00000000", "00000001", "00000002"]);
        assert_eq!(book.resolved.len(), KEEP_RESOLVED);
        assert_eq!(
            book.decide("00000000", Decision::Denied, "@a:x", 99)
                .map(|a| a.id.clone()),
            Err(DecideError::Unknown)
        );
    }

    #[test]
    fn loading_denies_the_expired_and_ends_the_interrupted() {
        let now = 10_000;
        let expired = approval("expired1", 1, now);
        let pending = approval("pending1", 1, now + 1);
        let mut running = approval("running1", 1, now + 5);
        running.decision = Some(Decision::Approved);
        running.by = Some("@a:x".into());
        running.decided_at_ms = Some(5);
        let mut done = approval("done0001", 1, 100);
        done.decision = Some(Decision::Denied);
        done.by = Some("@a:x".into());
        done.decided_at_ms = Some(50);

        let (book, report) = Book::load(vec![expired, pending, running, done], now);
        let mut ended = report.ended.clone();
        ended.sort();
        assert_eq!(ended, ["expired1", "running1"]);
        assert!(report.evicted.is_empty());
        assert_eq!(book.open.keys().collect::<Vec<_>>(), ["pending1"]);
        assert_eq!(book.pending(), 1);
        let e = book.get("expired1").expect("expired").outcome();
        assert_eq!(
            (e.decision, e.by.as_str(), e.result),
            (Decision::Denied, TIMEOUT_BY, None)
        );
        let r = book.get("running1").expect("running").outcome();
        assert_eq!(r.decision, Decision::Approved);
        assert_eq!(r.error.map(|e| e.code), Some(code::INTERNAL.to_string()));
        let d = book.get("done0001").expect("done").outcome();
        assert_eq!(d.by, "@a:x");
    }

    #[test]
    fn stored_approvals_round_trip_with_mode_0600() {
        let scratch = Scratch::new("store");
        let store = Store {
            dir: scratch.0.join("approvals"),
        };
        assert!(store.load().expect("no dir yet").is_empty());
        let pending = approval("abcd1234", 1, 2);
        let mut over = approval("wxyz9876", 1, 2);
        over.decision = Some(Decision::Approved);
        over.by = Some("@Owner:x".into());
        over.decided_at_ms = Some(3);
        over.outcome = Some(Outcome::Error(ErrorBody {
            code: "node_offline".into(),
            message: "gone".into(),
        }));
        store.save(&pending).expect("save");
        store.save(&over).expect("save");
        over.outcome = Some(Outcome::Result(json!({"stdout": "ok"})));
        store.save(&over).expect("save again");
        // Junk next to them is skipped or cleaned up, never fatal.
        fs::write(store.dir.join("garbage1.json"), "{not json").expect("junk");
        fs::write(store.dir.join(".zzzz0000.json.tmp"), "partial").expect("tmp");
        fs::write(store.dir.join("README"), "hi").expect("other");

        let mut loaded = store.load().expect("load");
        loaded.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(loaded, vec![pending, over]);
        assert!(!store.dir.join(".zzzz0000.json.tmp").exists());
        let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&store.path("abcd1234")), 0o600);
        assert_eq!(mode(&store.dir), 0o700);
        store.remove("abcd1234").expect("remove");
        store.remove("abcd1234").expect("remove twice");
        assert_eq!(store.load().expect("load").len(), 1);
    }

    /// Plays a node's session: catches the invocations sent to the node.
    struct Catcher;

    impl Actor for Catcher {
        type Msg = NodeMsg;
        type State = tokio::sync::mpsc::UnboundedSender<Invoke>;
        type Arguments = tokio::sync::mpsc::UnboundedSender<Invoke>;

        async fn pre_start(
            &self,
            _myself: ActorRef<NodeMsg>,
            tx: Self::Arguments,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(tx)
        }

        async fn handle(
            &self,
            _myself: ActorRef<NodeMsg>,
            msg: NodeMsg,
            tx: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            if let NodeMsg::Invoke(invoke) = msg {
                let _ = tx.send(invoke);
            }
            Ok(())
        }
    }

    /// Plays the asking sessions: a reply port per request id, and what came back on it.
    #[derive(Clone, Default)]
    struct Replies(Arc<std::sync::Mutex<HashMap<String, oneshot::Receiver<Frame>>>>);

    impl Replies {
        /// The reply port of request `req`.
        fn to(&self, req: &str) -> ReplyTo {
            let (port, answer) = oneshot::channel();
            let mut waiting = self.0.lock().expect("lock");
            waiting.insert(req.to_string(), answer);
            ReplyTo::new(port.into(), req)
        }
    }

    /// The payload (or error) of the reply to `req`, which must answer `req`.
    async fn reply(replies: &Replies, req: &str) -> Value {
        let answer = replies.0.lock().expect("lock").remove(req);
        let answer = answer.expect("a reply port for the request");
        let frame = tokio::time::timeout(Duration::from_secs(3600), answer)
            .await
            .expect("a reply within the hour")
            .expect("answered");
        match frame {
            Frame::Res {
                id, payload, error, ..
            } => {
                assert_eq!(id, req);
                payload.unwrap_or_else(|| json!({ "error": to_value(&error) }))
            }
            other => panic!("not a res: {}", other.to_text()),
        }
    }

    async fn next_requested(
        rx: &mut tokio::sync::broadcast::Receiver<Arc<super::super::hub::HubEvent>>,
    ) -> Value {
        loop {
            let ev = rx.recv().await.expect("hub");
            if ev.name == event::APPROVAL_REQUESTED {
                let frame: Value = serde_json::from_str(&ev.text).expect("json");
                return frame["payload"].clone();
            }
        }
    }

    /// A [`Catcher`] session registered as node `box` with command `disk`: the invocations
    /// sent to it arrive on the receiver; the registration keeps the node online. With the
    /// [`Replies`] of the sessions that ask the broker.
    async fn catcher_node(
        gateway: &GatewayState,
    ) -> (
        Replies,
        tokio::sync::mpsc::UnboundedReceiver<Invoke>,
        super::super::registry::Registration,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (session, _) = Actor::spawn(None, Catcher, tx).await.expect("catcher");
        let (node, _) = super::super::registry::Registration::register(
            gateway,
            "box",
            "node:box",
            vec!["disk".into()],
            1,
            session.get_derived(),
        )
        .expect("registered");
        (Replies::default(), rx, node)
    }

    async fn spawn_broker(gateway: &GatewayState) -> ActorRef<ApprovalsMsg> {
        let args = ApprovalsArgs {
            gateway: gateway.clone(),
            span: tracing::Span::none(),
        };
        Actor::spawn(None, ApprovalsActor, args)
            .await
            .expect("broker")
            .0
    }

    /// Gateway settings with operator `default` (`gateway.token`) and `names`: the
    /// requesters the tests use exist, as they do for a session that could ask.
    fn operators(names: &[&str]) -> super::super::GatewaySettings {
        let credential = |name: &str| super::super::Credential {
            token: Some(format!("tok-{name}")),
            token_file: None,
        };
        super::super::GatewaySettings {
            token: Some("tok-default".into()),
            operators: names
                .iter()
                .map(|name| (name.to_string(), credential(name)))
                .collect(),
            ..Default::default()
        }
    }

    /// A gateway whose approvals are stored in `scratch` and decided, for account nova, by
    /// `approver`.
    fn gateway_with_approver(scratch: &Scratch, approver: &str) -> GatewayState {
        let gateway = GatewayState::new(operators(&["a", "b", "alice", "bob"]));
        let mut settings = ApprovalsSettings::new(scratch.0.join("approvals"));
        settings
            .approvers
            .insert("nova".into(), vec![approver.into()]);
        assert!(gateway.set_approvals(settings).is_ok());
        gateway
    }

    #[tokio::test(start_paused = true)]
    async fn a_revoked_operators_pending_approvals_are_denied() {
        let scratch = Scratch::new("revoked");
        let gateway = gateway_with_approver(&scratch, "@owner:x");
        let _broker = spawn_broker(&gateway).await;
        let (replies, _rx, _node) = catcher_node(&gateway).await;
        let mut hub = gateway.hub().subscribe();
        let client = gateway.approvals().expect("configured").clone();
        let request = |req: &str, requester: &str| ApprovalsMsg::Request {
            params: ApprovalRequestParams {
                node: "box".into(),
                command: "disk".into(),
                args: json!([]),
                reason: "why".into(),
                timeout_s: None,
                account: None,
            },
            requester: requester.into(),
            reply: replies.to(req),
        };
        client.send(request("a", "operator:alice")).expect("send");
        let kept = next_requested(&mut hub).await["id"].clone();
        client.send(request("b", "operator:bob")).expect("send");
        let revoked = next_requested(&mut hub).await["id"].clone();
        // Bob is no longer configured: his request is denied, alice's stays pending.
        // A reload keeps alice only; it tells the broker itself.
        gateway.reconfigure(operators(&["alice"]));
        assert_eq!(
            reply(&replies, "b").await,
            json!({"id": revoked, "decision": "denied", "by": REVOKED_BY})
        );
        // A request bob's session had already sent is refused.
        client.send(request("late", "operator:bob")).expect("send");
        assert_eq!(reply(&replies, "late").await["error"]["code"], "forbidden");
        // Alice's is still pending: an approver can still approve it.
        let kept_id = kept.as_str().expect("id");
        client
            .send(notified(kept_id, "@owner:x", "nova", replies.to("n")))
            .expect("send");
        reply(&replies, "n").await;
        client
            .send(decision(
                kept_id,
                Verdict::Approve,
                "@owner:x",
                "nova",
                "!dm-nova:x",
                replies.to("decide"),
            ))
            .expect("send");
        assert_eq!(
            reply(&replies, "decide").await,
            json!({"id": kept, "decision": "approved"})
        );
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_approval_invoke_and_reload_on_the_paused_clock() {
        let scratch = Scratch::new("actor");
        let gateway = gateway_with_approver(&scratch, "@Owner:x");
        let broker = spawn_broker(&gateway).await;
        let (replies, mut rx, _node) = catcher_node(&gateway).await;
        let mut hub = gateway.hub().subscribe();
        let client = gateway.approvals().expect("configured").clone();
        let request = |req: &str, timeout_s: Option<u64>| ApprovalsMsg::Request {
            params: ApprovalRequestParams {
                node: "box".into(),
                command: "disk".into(),
                args: json!(["-h"]),
                reason: "full?".into(),
                timeout_s,
                account: None,
            },
            requester: "operator:default".into(),
            reply: replies.to(req),
        };
        let resolve = |req: &str, id: &str, verdict, by: &str, account: &str| {
            decision(id, verdict, by, account, "!dm-nova:x", replies.to(req))
        };

        // No decision within timeout_s: denied by timeout, exactly then.
        let start = tokio::time::Instant::now();
        client.send(request("r1", Some(1))).expect("send");
        let requested = next_requested(&mut hub).await;
        let id1 = requested["id"].as_str().expect("id").to_string();
        assert!(is_valid_id(&id1));
        let out = reply(&replies, "r1").await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert_eq!(
            out,
            json!({"id": id1, "decision": "denied", "by": "timeout"})
        );

        // Approved by a listed approver (any case): the node gets the command, and the
        // requester the node's payload.
        client.send(request("r2", None)).expect("send");
        let id2 = next_requested(&mut hub).await["id"]
            .as_str()
            .expect("id")
            .to_string();
        client
            .send(resolve("r3", &id2, Verdict::Approve, "@other:x", "nova"))
            .expect("send");
        assert_eq!(reply(&replies, "r3").await["error"]["code"], "forbidden");
        // Not yet told: the approver's decision does not count.
        client
            .send(resolve("r3b", &id2, Verdict::Approve, "@owner:X", "nova"))
            .expect("send");
        let early = reply(&replies, "r3b").await;
        assert_eq!(early["error"]["code"], "forbidden", "{early}");
        client
            .send(notified(&id2, "@Owner:x", "nova", replies.to("n2")))
            .expect("send");
        assert_eq!(reply(&replies, "n2").await["recorded"], true);
        client
            .send(resolve("r4", &id2, Verdict::Approve, "@owner:X", "nova"))
            .expect("send");
        assert_eq!(
            reply(&replies, "r4").await,
            json!({"id": id2, "decision": "approved"})
        );
        let Some(invoke) = rx.recv().await else {
            panic!("the node got no invocation");
        };
        assert_eq!(
            (invoke.command.as_str(), &invoke.args),
            ("disk", &json!(["-h"]))
        );
        client
            .send(resolve("r5", &id2, Verdict::Deny, "@owner:x", "nova"))
            .expect("send");
        assert_eq!(
            reply(&replies, "r5").await["error"]["code"],
            "already_resolved"
        );
        client
            .send(resolve("r6", "nope0000", Verdict::Deny, "@owner:x", "nova"))
            .expect("send");
        assert_eq!(
            reply(&replies, "r6").await["error"]["code"],
            "unknown_approval"
        );
        invoke.reply.send(Ok(json!({"exit_code": 0})));
        assert_eq!(
            reply(&replies, "r2").await,
            json!({"id": id2, "decision": "approved", "by": "@owner:X", "result": {"exit_code": 0},
                "via": {"account": "nova", "room_id": "!dm-nova:x", "event_id": format!("$answer-{id2}")}})
        );

        // A pending approval survives a restart of the broker; its requester is told.
        client.send(request("r7", None)).expect("send");
        let id3 = next_requested(&mut hub).await["id"]
            .as_str()
            .expect("id")
            .to_string();
        client
            .send(notified(&id3, "@Owner:x", "nova", replies.to("n3")))
            .expect("send");
        reply(&replies, "n3").await;
        broker.stop_and_wait(None, None).await.expect("stop");
        assert_eq!(reply(&replies, "r7").await["error"]["code"], "internal");
        assert!(
            client
                .send(ApprovalsMsg::List {
                    params: ApprovalsListParams::default(),
                    reply: replies.to("x"),
                })
                .is_err()
        );
        let _broker = spawn_broker(&gateway).await;
        client
            .send(ApprovalsMsg::List {
                params: ApprovalsListParams::default(),
                reply: replies.to("r8"),
            })
            .expect("send");
        let list = reply(&replies, "r8").await;
        assert!(list.get("next").is_none(), "{list}");
        let summary: Vec<(String, bool)> = list["approvals"]
            .as_array()
            .expect("array")
            .iter()
            .map(|a| {
                (
                    a["id"].as_str().unwrap_or_default().to_string(),
                    a["resolved"] == true,
                )
            })
            .collect();
        assert_eq!(summary, [(id3.clone(), false), (id2, true), (id1, true)]);
        client
            .send(resolve("r9", &id3, Verdict::Deny, "@owner:x", "nova"))
            .expect("send");
        assert_eq!(
            reply(&replies, "r9").await,
            json!({"id": id3, "decision": "denied"})
        );
    }

    /// A chat account that is ready or not, as the test says; it sends nothing.
    struct Switch(std::sync::atomic::AtomicBool);

    impl super::super::chat::ChatAccount for Switch {
        fn send(&self, _: super::super::chat::SendParams) -> super::super::chat::SendFuture {
            Box::pin(async { Err(super::super::chat::ChatError::NotReady("test".into())) })
        }
        fn act(&self, _: super::super::chat::ChatAction) -> super::super::chat::ActFuture {
            Box::pin(async { Err(super::super::chat::ChatError::NotReady("test".into())) })
        }
        fn is_ready(&self) -> bool {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    /// The payload of the next hub event named `name`, or none within `within`.
    async fn next_named(
        rx: &mut tokio::sync::broadcast::Receiver<Arc<super::super::hub::HubEvent>>,
        name: &str,
        within: Duration,
    ) -> Option<Value> {
        tokio::time::timeout(within, async {
            loop {
                let ev = rx.recv().await.expect("hub");
                if ev.name == name {
                    let frame: Value = serde_json::from_str(&ev.text).expect("json");
                    return frame["payload"].clone();
                }
            }
        })
        .await
        .ok()
    }

    #[test]
    fn routing_picks_one_account_per_approver() {
        let routing = ApprovalRouting {
            approvers: BTreeMap::from([
                ("a".into(), vec!["@Owner:x".into()]),
                ("b".into(), vec!["@owner:x".into(), "@second:x".into()]),
                ("c".into(), vec!["@owner:x".into()]),
            ]),
            default_account: Some("c".into()),
            renotify_after: Duration::from_secs(60),
        };
        assert_eq!(routing.approvers_for(None), ["@Owner:x", "@second:x"]);
        assert_eq!(routing.approvers_for(Some("c")), ["@owner:x"]);
        let all = |_: &str| true;
        let none = |_: &str| false;
        let only_b = |a: &str| a == "b";
        assert_eq!(
            routing.route(None, "@owner:x", all, None).as_deref(),
            Some("c"),
            "the default when ready"
        );
        assert_eq!(
            routing.route(None, "@second:x", all, None).as_deref(),
            Some("b"),
            "the default does not list it"
        );
        assert_eq!(
            routing.route(None, "@owner:x", only_b, None).as_deref(),
            Some("b"),
            "else the first ready by alias"
        );
        assert_eq!(
            routing.route(None, "@owner:x", none, None).as_deref(),
            Some("c"),
            "none ready: the default waits"
        );
        assert_eq!(
            routing.route(None, "@owner:x", all, Some("c")).as_deref(),
            Some("a"),
            "handed on: not the one that is down"
        );
        assert_eq!(
            routing.route(None, "@second:x", all, Some("b")),
            None,
            "nobody else lists it"
        );
        assert_eq!(
            routing.route(None, "@owner:x", none, Some("c")),
            None,
            "nobody ready to take over"
        );
        assert_eq!(
            routing.route(Some("a"), "@owner:x", none, None).as_deref(),
            Some("a"),
            "pinned, ready or not"
        );
        assert_eq!(
            routing.route(Some("a"), "@second:x", all, None),
            None,
            "pinned: its approvers only"
        );
    }

    /// Three accounts list one approver: one request gets one notification (the first
    /// ready account), pinned requests stay with their account, a notifying account down
    /// past `renotify_after` hands its approver on exactly once, and a decision counts
    /// only where the approver was asked; the record says where it was made.
    #[tokio::test(start_paused = true)]
    async fn one_notice_per_approver_handed_on_once_and_decided_only_where_asked() {
        let scratch = Scratch::new("routing");
        let gateway = GatewayState::new(operators(&[]));
        let mut settings = ApprovalsSettings::new(scratch.0.join("approvals"));
        settings.approvers = BTreeMap::from([
            ("a".into(), vec!["@owner:x".into()]),
            ("b".into(), vec!["@Owner:x".into(), "@second:x".into()]),
            ("c".into(), vec!["@owner:x".into()]),
        ]);
        settings.renotify_after = Duration::from_secs(3);
        assert!(gateway.set_approvals(settings).is_ok());
        let switch = |ready: bool| Arc::new(Switch(std::sync::atomic::AtomicBool::new(ready)));
        let (a, b, c) = (switch(false), switch(true), switch(true));
        gateway.chat().register("a", a.clone());
        gateway.chat().register("b", b.clone());
        gateway.chat().register("c", c.clone());
        // Each account's approval handler is connected.
        let _handlers = ["a", "b", "c"].map(|account| {
            gateway.count_role(super::super::protocol::Role::Approver, Some(account))
        });
        let _broker = spawn_broker(&gateway).await;
        let (replies, _rx, _node) = catcher_node(&gateway).await;
        let mut hub = gateway.hub().subscribe();
        let client = gateway.approvals().expect("configured").clone();
        let request = |req: &str, account: Option<&str>| ApprovalsMsg::Request {
            params: ApprovalRequestParams {
                node: "box".into(),
                command: "disk".into(),
                args: json!([]),
                reason: "why".into(),
                timeout_s: None,
                account: account.map(str::to_string),
            },
            requester: "operator:default".into(),
            reply: replies.to(req),
        };
        let targets = |payload: &Value| -> Vec<(String, String)> {
            payload["notify"]
                .as_array()
                .expect("notify")
                .iter()
                .map(|t| {
                    (
                        t["approver"].as_str().expect("approver").into(),
                        t["account"].as_str().expect("account").into(),
                    )
                })
                .collect()
        };
        let pair = |approver: &str, account: &str| (approver.to_string(), account.to_string());

        // One notice per distinct approver: a is down, so b (first ready by alias).
        client.send(request("r1", None)).expect("send");
        let first = next_named(&mut hub, event::APPROVAL_REQUESTED, Duration::from_secs(1))
            .await
            .expect("requested");
        let id = first["id"].as_str().expect("id").to_string();
        assert_eq!(
            targets(&first),
            [pair("@Owner:x", "b"), pair("@second:x", "b")],
            "b's own spelling of the owner"
        );

        // Pinned to a (down): only a's approvers, through a, and never handed on.
        client.send(request("r2", Some("a"))).expect("send");
        let pinned = next_named(&mut hub, event::APPROVAL_REQUESTED, Duration::from_secs(1))
            .await
            .expect("requested");
        assert_eq!(targets(&pinned), [pair("@owner:x", "a")]);
        client.send(request("r3", Some("nope"))).expect("send");
        assert_eq!(
            reply(&replies, "r3").await["error"]["code"],
            "unknown_account"
        );

        // b delivers to both; the owner's answer elsewhere, or on another event, is refused.
        for approver in ["@owner:x", "@second:x"] {
            client
                .send(notified(&id, approver, "b", replies.to("n")))
                .expect("send");
            assert_eq!(reply(&replies, "n").await["recorded"], true);
        }
        client
            .send(decision(
                &id,
                Verdict::Approve,
                "@owner:x",
                "b",
                "!group:x",
                replies.to("d1"),
            ))
            .expect("send");
        let refused = reply(&replies, "d1").await;
        assert_eq!(refused["error"]["code"], "forbidden", "{refused}");
        let reaction = |req: &str, on: &str, account: &str, room: &str| ApprovalsMsg::Resolve {
            params: ApprovalResolveParams {
                id: None,
                decision: Verdict::Approve,
                by: "@owner:x".into(),
                room_id: room.into(),
                event_id: "$reaction".into(),
                relates_to: Some(on.into()),
            },
            account: Some(account.into()),
            reply: replies.to(req),
        };
        client
            .send(reaction("d2", "$unrelated", "b", "!dm-b:x"))
            .expect("send");
        assert_eq!(
            reply(&replies, "d2").await["error"]["code"],
            "unknown_approval"
        );

        // b and c go down together (a shared outage): nobody could take over, so nothing
        // moves, however long it lasts.
        let set = |s: &Switch, ready: bool| s.0.store(ready, std::sync::atomic::Ordering::SeqCst);
        set(&b, false);
        set(&c, false);
        assert!(
            next_named(&mut hub, event::APPROVAL_NOTIFY, Duration::from_secs(20))
                .await
                .is_none(),
            "handed over while no other account was ready"
        );
        // c is back, b is not: renotify_after later the owner is handed to c; nobody else
        // lists the second approver, so theirs stays with b.
        set(&c, true);
        let start = tokio::time::Instant::now();
        let handed = next_named(&mut hub, event::APPROVAL_NOTIFY, Duration::from_secs(10))
            .await
            .expect("handed on");
        assert!(
            start.elapsed() >= Duration::from_secs(3),
            "handed on after {:?}",
            start.elapsed()
        );
        assert_eq!(handed["id"], id.as_str());
        assert_eq!(targets(&handed), [pair("@owner:x", "c")]);
        // c delivers it. Once: c down and b back moves nothing more.
        client
            .send(notified(&id, "@owner:x", "c", replies.to("nc")))
            .expect("send");
        assert_eq!(reply(&replies, "nc").await["recorded"], true);
        set(&c, false);
        set(&b, true);
        assert!(
            next_named(&mut hub, event::APPROVAL_NOTIFY, Duration::from_secs(30))
                .await
                .is_none(),
            "handed on more than once"
        );
        // A reload that stops c listing the owner moves the owner's notice back to b at once.
        let mut routing = ApprovalRouting::clone(&gateway.approval_routing());
        routing.approvers.insert("c".into(), vec![]);
        gateway.set_approval_routing(routing);
        let moved = next_named(&mut hub, event::APPROVAL_NOTIFY, Duration::from_secs(2))
            .await
            .expect("moved off an account that no longer lists the approver");
        assert_eq!(targets(&moved), [pair("@Owner:x", "b")], "b's own spelling");

        // The reaction on b's request message still counts (the owner was asked there);
        // the record says where.
        client
            .send(reaction("d3", &format!("$req-{id}-b"), "b", "!dm-b:x"))
            .expect("send");
        assert_eq!(
            reply(&replies, "d3").await,
            json!({"id": id, "decision": "approved"})
        );
        client
            .send(ApprovalsMsg::List {
                params: ApprovalsListParams::default(),
                reply: replies.to("l"),
            })
            .expect("send");
        let list = reply(&replies, "l").await;
        let entry = list["approvals"]
            .as_array()
            .expect("list")
            .iter()
            .find(|a| a["id"] == id.as_str())
            .cloned()
            .expect("listed");
        assert_eq!(
            entry["via"],
            json!({"account": "b", "room_id": "!dm-b:x", "event_id": "$reaction"}),
            "{entry}"
        );
    }

    #[test]
    fn approvers_compare_case_insensitively_per_account() {
        let mut settings = ApprovalsSettings::new("/nonexistent");
        settings
            .approvers
            .insert("nova".into(), vec!["@Owner:Example.org".into()]);
        assert!(settings.may_decide(Some("nova"), "@owner:example.org"));
        assert!(!settings.may_decide(Some("nova"), "@other:example.org"));
        assert!(!settings.may_decide(Some("other"), "@owner:example.org"));
        assert!(!settings.may_decide(None, "@owner:example.org"));
    }

    fn params(reason: String, args: Value) -> ApprovalRequestParams {
        ApprovalRequestParams {
            node: "box".into(),
            command: "disk".into(),
            args,
            reason,
            timeout_s: None,
            account: None,
        }
    }

    /// A JSON string argument list whose compact JSON is exactly `bytes` long.
    fn args_of(bytes: usize) -> Value {
        // `["…"]` is the string plus 4 bytes.
        let args = json!(["x".repeat(bytes - 4)]);
        assert_eq!(json_len(&args), bytes);
        assert_eq!(
            json_len(&args),
            serde_json::to_vec(&args).expect("json").len()
        );
        args
    }

    #[test]
    fn request_limits_name_the_field_the_limit_and_the_cap() {
        assert_eq!(
            (
                DEFAULT_MAX_OPEN,
                DEFAULT_MAX_REASON_BYTES,
                DEFAULT_MAX_ARGS_BYTES
            ),
            (1_000, 4_096, 16_384)
        );
        let settings = ApprovalsSettings::new("/nonexistent");
        let ok = |p: &ApprovalRequestParams, open| settings.check_request(p, open);
        let at_limits = params("é".repeat(2048), args_of(16_384));
        assert_eq!(at_limits.reason.len(), 4096);
        assert_eq!(ok(&at_limits, 999), Ok(()));
        assert_eq!(ok(&params("r".into(), Value::Null), 0), Ok(()));

        let (c, message) = ok(&params("r".repeat(4097), Value::Null), 0).expect_err("reason");
        assert_eq!(c, code::TOO_LARGE);
        assert!(
            message.contains("`reason`") && message.contains("4097") && message.contains("4096"),
            "{message}"
        );
        let (c, message) = ok(&params("r".into(), args_of(16_385)), 0).expect_err("args");
        assert_eq!(c, code::TOO_LARGE);
        assert!(
            message.contains("`args`") && message.contains("16385") && message.contains("16384"),
            "{message}"
        );
        let (c, message) = ok(&at_limits, 1_000).expect_err("cap");
        assert_eq!(c, code::BUSY);
        assert!(message.contains("1000 open approvals"), "{message}");
    }

    #[tokio::test(start_paused = true)]
    async fn one_requester_cannot_take_the_whole_cap() {
        let scratch = Scratch::new("per-requester");
        let gateway = GatewayState::new(operators(&["a", "b", "alice", "bob"]));
        let mut settings = ApprovalsSettings::new(scratch.0.join("approvals"));
        settings.max_open_per_requester = 1;
        assert!(gateway.set_approvals(settings).is_ok());
        let _broker = spawn_broker(&gateway).await;
        let (replies, _rx, _node) = catcher_node(&gateway).await;
        let mut hub = gateway.hub().subscribe();
        let client = gateway.approvals().expect("configured").clone();
        let request = |req: &str, requester: &str| ApprovalsMsg::Request {
            params: params("why".into(), Value::Null),
            requester: requester.into(),
            reply: replies.to(req),
        };
        client.send(request("a1", "operator:a")).expect("send");
        next_requested(&mut hub).await;
        client.send(request("a2", "operator:a")).expect("send");
        let out = reply(&replies, "a2").await;
        assert_eq!(out["error"]["code"], "busy", "{out}");
        let message = out["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("per requester"), "{message}");
        client.send(request("b1", "operator:b")).expect("send");
        assert!(is_valid_id(
            next_requested(&mut hub).await["id"].as_str().expect("id")
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_broker_refuses_over_the_caps_and_stores_nothing() {
        let scratch = Scratch::new("caps");
        let gateway = GatewayState::new(operators(&["a", "b", "alice", "bob"]));
        let mut settings = ApprovalsSettings::new(scratch.0.join("approvals"));
        settings
            .approvers
            .insert("nova".into(), vec!["@owner:x".into()]);
        settings.max_open = 2;
        assert!(gateway.set_approvals(settings).is_ok());
        let _broker = spawn_broker(&gateway).await;
        let (replies, _rx, _node) = catcher_node(&gateway).await;
        let mut hub = gateway.hub().subscribe();
        let client = gateway.approvals().expect("configured").clone();
        let request = |req: &str, reason: String, args: Value| ApprovalsMsg::Request {
            params: params(reason, args),
            requester: "operator:a".into(),
            reply: replies.to(req),
        };
        let files = || {
            fs::read_dir(scratch.0.join("approvals"))
                .map(|d| d.count())
                .unwrap_or(0)
        };

        // Over a size limit: refused at once, nothing stored or announced.
        client
            .send(request("big-reason", "r".repeat(5 * 1024), Value::Null))
            .expect("send");
        let out = reply(&replies, "big-reason").await;
        assert_eq!(out["error"]["code"], "too_large", "{out}");
        client
            .send(request("big-args", "r".into(), args_of(16_385)))
            .expect("send");
        let out = reply(&replies, "big-args").await;
        assert_eq!(out["error"]["code"], "too_large", "{out}");
        assert_eq!(files(), 0);

        // Two open: the third is `busy`, naming the cap.
        client
            .send(request("r1", "one".into(), Value::Null))
            .expect("send");
        let id1 = next_requested(&mut hub).await["id"]
            .as_str()
            .expect("id")
            .to_string();
        client
            .send(request("r2", "two".into(), Value::Null))
            .expect("send");
        next_requested(&mut hub).await;
        client
            .send(request("r3", "three".into(), Value::Null))
            .expect("send");
        let out = reply(&replies, "r3").await;
        assert_eq!(out["error"]["code"], "busy", "{out}");
        let message = out["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("2 open approvals"), "{message}");
        assert_eq!(files(), 2);

        // One decided: room for one more.
        client
            .send(notified(&id1, "@owner:x", "nova", replies.to("n1")))
            .expect("send");
        reply(&replies, "n1").await;
        client
            .send(decision(
                &id1,
                Verdict::Deny,
                "@owner:x",
                "nova",
                "!dm-nova:x",
                replies.to("d1"),
            ))
            .expect("send");
        assert_eq!(reply(&replies, "d1").await["decision"], "denied");
        assert_eq!(reply(&replies, "r1").await["decision"], "denied");
        client
            .send(request("r4", "four".into(), Value::Null))
            .expect("send");
        assert!(is_valid_id(
            next_requested(&mut hub).await["id"].as_str().expect("id")
        ));
    }

    /// Every page of `book` from the start, `limit` entries each.
    fn all_pages(book: &Book, limit: usize) -> Vec<ApprovalPage> {
        let mut pages = vec![book.page(None, limit)];
        while let Some(next) = pages.last().and_then(|p| p.next.clone()) {
            pages.push(book.page(Some(&next), limit));
            assert!(pages.len() < 100, "pages never end");
        }
        pages
    }

    fn ids(pages: &[ApprovalPage]) -> Vec<String> {
        pages
            .iter()
            .flat_map(|p| p.approvals.iter().map(|a| a.id.clone()))
            .collect()
    }

    #[test]
    fn pages_walk_the_listing_once_in_order() {
        let mut book = Book::default();
        // Open: requested at 10, 10 (same ms: by id), 20, 30, 40.
        for (id, at) in [
            ("open0003", 20),
            ("open0002", 10),
            ("open0001", 10),
            ("open0004", 30),
            ("open0005", 40),
        ] {
            book.insert(approval(id, at, 1_000_000));
        }
        // Resolved, decided at 100, 300, 300 (same ms), 200.
        for (id, at) in [
            ("done0001", 100),
            ("done0002", 300),
            ("done0003", 300),
            ("done0004", 200),
        ] {
            book.insert(approval(id, 1, 1_000_000));
            book.decide(id, Decision::Denied, "@a:x", at)
                .expect("decide");
            book.close(id);
        }
        let expected = [
            "open0001", "open0002", "open0003", "open0004", "open0005", "done0003", "done0002",
            "done0004", "done0001",
        ];
        let whole = book.page(None, 200);
        assert_eq!(whole.next, None);
        let whole: Vec<&str> = whole.approvals.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(whole, expected);
        for limit in 1..=10 {
            let pages = all_pages(&book, limit);
            assert_eq!(ids(&pages), expected, "limit {limit}");
            assert_eq!(
                pages.len(),
                expected.len().div_ceil(limit).max(1),
                "limit {limit}"
            );
            assert!(pages.iter().all(|p| p.approvals.len() <= limit));
            assert!(pages.last().is_some_and(|p| p.next.is_none()));
        }
        assert_eq!(
            book.page(None, 3).next.map(|c| c.to_string()).as_deref(),
            Some("o20-open0003")
        );
        assert_eq!(
            book.page(None, 7).next.map(|c| c.to_string()).as_deref(),
            Some("r300-done0002")
        );
        // A cursor past everything: an empty last page.
        let end: ApprovalCursor = "r0-0".parse().expect("cursor");
        assert_eq!(book.page(Some(&end), 5).approvals, Vec::new());
    }

    #[test]
    fn a_cursor_survives_changes_between_pages() {
        let mut book = Book::default();
        for i in 0..6u64 {
            book.insert(approval(&format!("open000{i}"), 10 + i, 1_000_000));
        }
        let first = book.page(None, 3);
        let seen: Vec<String> = first.approvals.iter().map(|a| a.id.clone()).collect();
        assert_eq!(seen, ["open0000", "open0001", "open0002"]);
        let cursor = first.next.expect("more");

        // Between pages: one already listed is decided (it shows up again, resolved), one
        // not yet listed is decided (it is listed once, resolved), the one at the cursor is
        // decided (the cursor still holds), and a new request arrives (listed after the
        // open ones seen).
        for id in ["open0001", "open0002", "open0004"] {
            book.decide(id, Decision::Denied, "@a:x", 500)
                .expect("decide");
            book.close(id);
        }
        book.insert(approval("newer000", 99, 1_000_000));
        let mut pages = vec![book.page(Some(&cursor), 3)];
        while let Some(next) = pages.last().and_then(|p| p.next.clone()) {
            pages.push(book.page(Some(&next), 3));
        }
        assert_eq!(
            ids(&pages),
            [
                "open0003", "open0005", "newer000", "open0004", "open0002", "open0001"
            ]
        );
    }

    /// A stored approval padded with trailing whitespace (still valid JSON) to `bytes`.
    fn padded_file(dir: &Path, id: &str, bytes: u64) -> PathBuf {
        let mut text = serde_json::to_vec(&approval(id, 1, 2)).expect("json");
        text.resize(bytes as usize, b' ');
        let path = dir.join(format!("{id}.json"));
        fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn a_file_over_one_mib_is_skipped_at_load_and_left_in_place() {
        let scratch = Scratch::new("large");
        let store = Store {
            dir: scratch.0.join("approvals"),
        };
        store.ensure_dir().expect("dir");
        assert_eq!(MAX_FILE_BYTES, 1024 * 1024);
        let at_limit = padded_file(&store.dir, "atlimit1", MAX_FILE_BYTES);
        let over = padded_file(&store.dir, "overlim1", MAX_FILE_BYTES + 1);
        // A sparse 4 GiB file: only its metadata is ever looked at (reading it whole
        // would take seconds and 4 GiB of memory).
        let huge = store.dir.join("hugefil1.json");
        File::create(&huge)
            .and_then(|f| f.set_len(4 << 30))
            .expect("sparse");

        assert!(matches!(read_approval(&at_limit), Ok(a) if a.id == "atlimit1"));
        assert!(matches!(
            read_approval(&over),
            Err(Unreadable::TooLarge(n)) if n == MAX_FILE_BYTES + 1
        ));
        assert!(matches!(
            read_approval(&huge),
            Err(Unreadable::TooLarge(n)) if n == 4 << 30
        ));
        let loaded = store.load().expect("load");
        assert_eq!(
            loaded.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
            ["atlimit1"]
        );
        assert!(over.exists() && huge.exists(), "skipped files stay");
    }
}
