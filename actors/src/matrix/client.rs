//! The client actor of one Matrix account: opens its local state, restores the session or
//! logs in, syncs, forwards allowed messages, and sends.
//!
//! ## Start (in `post_start`, so the supervisor is not held)
//! 1. Look at `<state.dir>/matrix/<alias>/` (store.rs). Unusable local state — a store
//!    without `session.json`, an unreadable one, a session of another user, a restore that
//!    fails, or the SDK's "one-time key already uploaded" flag — is wiped and replaced by a
//!    fresh login when a password is configured (at most once per start); without one it is
//!    fatal, and the reason names the directory to remove.
//! 2. A saved session is restored: no login, and sync resumes from the inbox's position
//!    (see "Inbound messages" below). A configured `device_id` other than the saved
//!    session's is reported once per account (WARN) and the saved session is kept, token
//!    and all: its E2EE keys are its device's.
//!    Otherwise an `access_token` is used as it is (`whoami` only when `user_id` or
//!    `device_id` is missing: the crypto store is keyed by the device), or the password
//!    logs in, holding a slot of the `matrix_login` pool for the request. The session is
//!    saved to `session.json` (0600).
//! 3. A sync task runs `sync_once` in a loop and beats the liveness probe on each
//!    response. The account is ready after its first successful sync. Then, on every start,
//!    a configured `recovery_key` imports the account's secrets when they are missing here
//!    (`recover_if_missing`). A one-time-key conflict the SDK records after a sync (its key
//!    upload) ends the incarnation; the restart finds the flag and wipes (step 1).
//!
//! ## Inbound messages
//! Each sync response's messages (rooms joined and rooms left) pass the filters
//! (`inbound.rs`) and are committed to the inbox with the response's `next_batch`
//! (`store`) before the next sync, which starts from that position: the commit-order
//! invariant (`inbox/mod.rs`). A limited timeline of a room the account knew is
//! back-paginated to the previous position first (`backfill`). An incarnation that finds
//! the SDK's saved position ahead of the inbox's (a crash between the two writes) reads the
//! difference back first (`catch_up`).
//!
//! ## Messages
//! `Send` — `chat.send` through this account; `Notify` — tell the approvers about an
//! approval request (from the account's approval handler). Both are answered from a task of
//! their own, off the actor, or at once with "not ready" before the first sync. `Synced` —
//! the first sync succeeded; `SyncFailed` — the sync task ended with an error.
//!
//! ## Supervision
//! `root/channels/matrix/<alias>/client`, the first child of its account's `rest_for_one`
//! supervisor (mod.rs): when the client restarts, the account's approval handler after it
//! restarts too. It has no child actors. Its state owns the sync task (aborted when the
//! state is dropped, on a stop or a kill), which beats the liveness probe on every response
//! and reports its end as `SyncFailed`. The account itself (`Account`) outlives
//! incarnations: `chat.send` and the approval handler reach whichever incarnation synced
//! last.
//!
//! ## Restart policy
//! Kind `matrix_account`: 1 s → 60 s, ×2, jitter 20 %, unlimited, reset after 60 s
//! healthy; fatal → park (the other accounts keep running); liveness 120 s without a sync
//! response → hung → restarted. There is no retry inside: the SDK's retries are off and any
//! error fails the incarnation (errors.rs classifies it). `M_UNKNOWN_TOKEN` with a password
//! wipes the session and the restart logs in again, once; without a password it is fatal.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use matrix_sdk::authentication::matrix::MatrixSession;
use matrix_sdk::config::{RequestConfig, SyncSettings};
use matrix_sdk::encryption::recovery::{RecoveryError, RecoveryState};
use matrix_sdk::encryption::secret_storage::SecretStorageError;
use matrix_sdk::room::MessagesOptions;
use matrix_sdk::ruma::api::client::filter::FilterDefinition;
use matrix_sdk::ruma::api::client::sync::sync_events::v3::Filter as SyncFilter;
use matrix_sdk::ruma::api::client::typing::create_typing_event::{
    self,
    v3::{Typing, TypingInfo},
};
use matrix_sdk::ruma::events::reaction::{OriginalSyncReactionEvent, ReactionEventContent};
use matrix_sdk::ruma::events::relation::{Annotation, Thread};
use matrix_sdk::ruma::events::room::member::{MembershipState, StrippedRoomMemberEvent};
use matrix_sdk::ruma::events::room::message::{
    MessageType, OriginalSyncRoomMessageEvent, Relation, ReplacementMetadata,
    RoomMessageEventContent,
};
use matrix_sdk::ruma::events::{
    AnySyncMessageLikeEvent, AnySyncTimelineEvent, MessageLikeEventContent, SyncMessageLikeEvent,
};
use matrix_sdk::ruma::serde::Raw;
use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId, OwnedTransactionId, OwnedUserId, UInt};
use matrix_sdk::store::StateStoreDataKey;
use matrix_sdk::sync::SyncResponse;
use matrix_sdk::{Client, ClientBuildError, Room, RoomState, SessionMeta, SessionTokens};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SpawnErr};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, warn};

use super::approvals::{ApprovalChannel, ApprovalRequest, Decision, Delivered, NotifyFuture};
use super::errors::{self, Class, During};
use super::inbound::Filter;
use super::store::{self, Local, Paths, SavedSession};
use super::{AccountConfig, LOGIN_POOL};
use crate::gateway::chat::{
    ActFuture, Chat, ChatAccount, ChatAction, ChatError, DEFAULT_TYPING_TIMEOUT_MS, Format,
    SendFuture, SendParams,
};
use crate::inbox::NewMessage;
use crate::supervision::{ChildContext, ChildSpec, Failure, Policy, Probe, Restart, SlotClient};
use crate::task::{self, AbortOnDrop};

/// The kind of the client child, for policies and metrics.
pub const KIND: &str = "matrix_account";

/// The client's built-in policy: killed as hung after 120 s without a heartbeat, otherwise
/// [`Policy::DEFAULT`].
pub const DEFAULT_POLICY: Policy = Policy {
    liveness_timeout: Some(Duration::from_secs(120)),
    ..Policy::DEFAULT
};

/// How long the homeserver may hold a `/sync` open.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of every request (a sync gets this on top of [`SYNC_TIMEOUT`]).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Events per room a resumed sync may return before the timeline has a gap.
const TIMELINE_LIMIT: u32 = 500;

/// One account, across incarnations of its client: what `chat.send` reaches and what
/// outlives a restart (recently forwarded events, whether a re-login was tried).
pub(crate) struct Account {
    config: AccountConfig,
    paths: Paths,
    chat: Chat,
    filter: Filter,
    /// The running incarnation once it is ready.
    current: RwLock<Option<ActorRef<ClientMsg>>>,
    /// Set when a rejected token made the account wipe its session; cleared by a good sync.
    relogged_in: AtomicBool,
    /// Set once the configured `device_id` was reported as differing from the saved
    /// session's (one WARN per account, not per restart).
    drift_reported: AtomicBool,
    /// The recovery of the latest incarnation; a newer one replaces (aborts) it, so each
    /// incarnation's recovery runs on its own client.
    recovery: Mutex<Option<AbortOnDrop>>,
    /// Set once "no secret storage" was reported (one WARN per account).
    no_storage_reported: AtomicBool,
    /// Approvers, lower-cased.
    approvers: HashSet<String>,
    /// Where approvers' decisions go: the running approval handler.
    decisions: RwLock<Option<mpsc::UnboundedSender<Decision>>>,
    /// One notification at a time, so two requests do not open two DMs with one approver.
    notifying: tokio::sync::Mutex<()>,
    /// The direct message made with each approver (lower-cased), until a sync shows it as
    /// one (`m.direct` reaches the SDK's store only through a sync).
    dm_rooms: Mutex<HashMap<String, OwnedRoomId>>,
    /// The account's own tasks (a recovery, joins on invite): each happens once, so they
    /// outlive a restart of the client; they end with the account.
    tasks: Mutex<JoinSet<()>>,
}

impl Account {
    pub fn new(config: AccountConfig, chat: Chat) -> Self {
        Self {
            paths: Paths::new(config.dir.clone()),
            filter: Filter::new(&config.allowed_rooms, &config.allowed_senders),
            current: RwLock::new(None),
            relogged_in: AtomicBool::new(false),
            drift_reported: AtomicBool::new(false),
            recovery: Mutex::new(None),
            no_storage_reported: AtomicBool::new(false),
            approvers: config
                .approvers
                .iter()
                .map(|a| a.to_ascii_lowercase())
                .collect(),
            decisions: RwLock::new(None),
            notifying: tokio::sync::Mutex::new(()),
            dm_rooms: Mutex::new(HashMap::new()),
            tasks: Mutex::new(JoinSet::new()),
            config,
            chat,
        }
    }

    fn is_approver(&self, user: &str) -> bool {
        self.approvers.contains(&user.to_ascii_lowercase())
    }

    /// Hands a decision to the approval handler; false when none runs.
    fn decide(&self, decision: Decision) -> bool {
        let decisions = self.decisions.read().unwrap_or_else(|e| e.into_inner());
        decisions
            .as_ref()
            .is_some_and(|tx| tx.send(decision).is_ok())
    }

    fn set_current(&self, actor: Option<ActorRef<ClientMsg>>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = actor;
    }

    /// Runs `work` as task `name` of the account, in the current span; a panic is logged.
    fn spawn(&self, name: &'static str, work: impl Future<Output = ()> + Send + 'static) {
        let report = |ended: task::Ended| {
            if ended.panicked() {
                warn!(error = %ended, "An account task failed.");
            }
        };
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task::watched(name, work, report).in_current_span());
    }
}

impl Account {
    /// Asks the running client for `msg` (made with the reply port) and waits for its
    /// answer: `account_not_ready` when no incarnation runs; `send_failed` when the
    /// incarnation ended with the request in flight (it may have been done, so this is not
    /// "not ready", which says nothing was).
    fn ask<T: Send + 'static>(
        &self,
        msg: impl FnOnce(oneshot::Sender<Result<T, ChatError>>) -> ClientMsg + Send + 'static,
    ) -> Pin<Box<dyn Future<Output = Result<T, ChatError>> + Send>> {
        let actor = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let alias = self.config.alias.clone();
        Box::pin(async move {
            let not_ready = || ChatError::NotReady(format!("account {alias:?} is not ready"));
            let actor = actor.ok_or_else(not_ready)?;
            let (reply, answer) = oneshot::channel();
            actor.send_message(msg(reply)).map_err(|_| not_ready())?;
            answer.await.map_err(|_| {
                ChatError::Failed(format!(
                    "account {alias:?} restarted during the call; it may have been done"
                ))
            })?
        })
    }
}

impl ChatAccount for Account {
    fn act(&self, action: ChatAction) -> ActFuture {
        self.ask(|reply| ClientMsg::Act { action, reply })
    }

    fn send(&self, params: SendParams) -> SendFuture {
        self.ask(|reply| ClientMsg::Send { params, reply })
    }

    fn is_ready(&self) -> bool {
        // A killed incarnation runs no `post_stop`: its reference stays until the next one
        // is ready, so its status is what tells.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|actor| actor.get_status() == ractor::ActorStatus::Running)
    }
}

impl ApprovalChannel for Account {
    fn notify(&self, request: ApprovalRequest, approvers: Vec<String>) -> NotifyFuture {
        let actor = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Box::pin(async move {
            let all_failed = |approvers: &[String], why: &str| {
                approvers
                    .iter()
                    .map(|a| (a.clone(), Err(why.to_string())))
                    .collect()
            };
            let Some(actor) = actor else {
                return all_failed(&approvers, "the Matrix account is not ready");
            };
            let (reply, answer) = oneshot::channel();
            let msg = ClientMsg::Notify {
                request,
                approvers: approvers.clone(),
                reply,
            };
            if actor.send_message(msg).is_err() {
                return all_failed(&approvers, "the Matrix account is not ready");
            }
            match answer.await {
                Ok(results) => results,
                Err(_) => all_failed(&approvers, "the Matrix account stopped"),
            }
        })
    }

    fn attach(&self, decisions: mpsc::UnboundedSender<Decision>) {
        *self.decisions.write().unwrap_or_else(|e| e.into_inner()) = Some(decisions);
    }
}

/// The client child's spec.
pub(crate) fn spec(account: Arc<Account>, policy: Policy, slots: SlotClient) -> ChildSpec {
    let label = format!("Matrix account {}", account.config.alias);
    ChildSpec::new(
        "client",
        KIND,
        Restart::Permanent,
        move |ctx: ChildContext| {
            let args = ClientArgs {
                account: account.clone(),
                slots: slots.clone(),
                probe: ctx.probe.clone(),
                first_start: ctx.is_first_start(),
                path: ctx.path.clone(),
                span: ctx.span(),
            };
            async move {
                let (actor, _) =
                    Actor::spawn_linked(None, ClientActor, args, ctx.supervisor.clone()).await?;
                Ok::<ActorCell, SpawnErr>(actor.get_cell())
            }
        },
    )
    .with_policy(policy)
    .with_label(label)
    .reports_readiness()
}

/// Messages of [`ClientActor`].
pub(crate) enum ClientMsg {
    /// `chat.send` through this account.
    Send {
        params: SendParams,
        reply: oneshot::Sender<Result<String, ChatError>>,
    },
    /// `chat.react`, `chat.edit`, `chat.typing` through this account.
    Act {
        action: ChatAction,
        reply: oneshot::Sender<Result<Option<String>, ChatError>>,
    },
    /// Tell approvers about an approval request.
    Notify {
        request: ApprovalRequest,
        approvers: Vec<String>,
        reply: oneshot::Sender<Vec<(String, Result<Delivered, String>)>>,
    },
    /// The first sync succeeded.
    Synced,
    /// The sync task ended.
    SyncFailed(Class),
}

/// The client actor.
pub(crate) struct ClientActor;

/// One incarnation's arguments.
pub(crate) struct ClientArgs {
    account: Arc<Account>,
    slots: SlotClient,
    probe: Probe,
    first_start: bool,
    path: String,
    span: tracing::Span,
}

/// A running client.
pub(crate) struct ClientState {
    args: ClientArgs,
    client: Option<Client>,
    ready: bool,
    /// The sync loop; ends with the state (a kill included).
    sync: Option<AbortOnDrop>,
    /// `chat.send` and notifications waiting on the homeserver; they end with the state,
    /// and their callers then get "not ready".
    requests: JoinSet<()>,
    /// Per room, the end of the last send queued there: the next one waits for it, so
    /// sends to one room go out in the order they came, a rate-limited one included.
    turns: HashMap<String, oneshot::Receiver<()>>,
}

impl Actor for ClientActor {
    type Msg = ClientMsg;
    type State = ClientState;
    type Arguments = ClientArgs;

    async fn pre_start(
        &self,
        _: ActorRef<ClientMsg>,
        args: ClientArgs,
    ) -> Result<ClientState, ActorProcessingErr> {
        Ok(ClientState {
            args,
            client: None,
            ready: false,
            sync: None,
            requests: JoinSet::new(),
            turns: HashMap::new(),
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<ClientMsg>,
        state: &mut ClientState,
    ) -> Result<(), ActorProcessingErr> {
        let span = state.args.span.clone();
        let started = Instant::now();
        let (client, resumed) = open(&state.args).instrument(span.clone()).await?;
        add_handlers(&client, &state.args.account);
        let actor = myself.clone();
        // A sync loop that returns has reported `SyncFailed` itself; one that panics has not.
        let report = move |ended: task::Ended| {
            if ended.panicked() {
                let failure = Failure::transient(ended.to_string());
                let _ = actor.send_message(ClientMsg::SyncFailed(Class::Transient(failure)));
            }
        };
        let sync = sync_loop(
            client.clone(),
            myself,
            state.args.probe.clone(),
            started,
            resumed,
            state.args.account.clone(),
        );
        state.sync = Some(task::spawn("sync", span, sync, report));
        state.client = Some(client);
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<ClientMsg>,
        state: &mut ClientState,
    ) -> Result<(), ActorProcessingErr> {
        let account = &state.args.account;
        let mut current = account.current.write().unwrap_or_else(|e| e.into_inner());
        if current
            .as_ref()
            .is_some_and(|a| a.get_id() == myself.get_id())
        {
            *current = None;
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ClientMsg>,
        msg: ClientMsg,
        state: &mut ClientState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ClientMsg::Send { params, reply } => {
                let room = Some(params.room_id.clone());
                state.chat_request("send", room, reply, |client, account, since| async move {
                    send(&client, &account, params, since).await
                });
                Ok(())
            }
            ClientMsg::Act { action, reply } => {
                // A typing notice is no message: it waits for no send.
                let room = match &action {
                    ChatAction::Typing(_) => None,
                    other => Some(other.room_id().to_string()),
                };
                state.chat_request("act", room, reply, |client, account, since| async move {
                    act(&client, &account, action, since).await
                });
                Ok(())
            }
            ClientMsg::Notify {
                request,
                approvers,
                reply,
            } => {
                match (&state.client, state.ready) {
                    (Some(client), true) => {
                        let client = client.clone();
                        let account = state.args.account.clone();
                        let task = async move {
                            let sent = notify(&client, &account, &request, approvers).await;
                            let _ = reply.send(sent);
                        };
                        state.request("notify", task);
                    }
                    _ => {
                        let why = || Err("the Matrix account is not ready".to_string());
                        let _ = reply.send(approvers.into_iter().map(|a| (a, why())).collect());
                    }
                }
                Ok(())
            }
            ClientMsg::Synced => {
                state.ready = true;
                state.args.account.set_current(Some(myself));
                state
                    .args
                    .account
                    .relogged_in
                    .store(false, Ordering::Relaxed);
                Ok(())
            }
            ClientMsg::SyncFailed(class) => {
                state.args.probe.set_ready(false);
                Err(Box::new(settle(&state.args, class)))
            }
        }
    }
}

impl ClientState {
    /// Runs `work`, which answers a caller, as task `name` of this incarnation.
    /// A chat request (`chat.send`, `chat.react` …): `work` runs on the synced client as a
    /// request of this incarnation and answers `reply`; before the first sync, or without a
    /// client, `reply` gets `account_not_ready` at once. With a `room`, it starts only once
    /// the requests queued for that room before it have ended.
    fn chat_request<T, F>(
        &mut self,
        name: &'static str,
        room: Option<String>,
        reply: oneshot::Sender<Result<T, ChatError>>,
        work: impl FnOnce(Client, Arc<Account>, Instant) -> F,
    ) where
        T: Send + 'static,
        F: Future<Output = Result<T, ChatError>> + Send + 'static,
    {
        let account = self.args.account.clone();
        match (&self.client, self.ready) {
            (Some(client), true) => {
                // A rate-limited send's budget counts from here, its wait in the queue too.
                let answer = work(client.clone(), account, Instant::now());
                let (done, ended) = oneshot::channel::<()>();
                let before = room.and_then(|room| {
                    // Turns that ended are forgotten: at most one per room in flight stays.
                    self.turns.retain(|_, t| {
                        matches!(t.try_recv(), Err(oneshot::error::TryRecvError::Empty))
                    });
                    self.turns.insert(room, ended)
                });
                self.request(name, async move {
                    if let Some(before) = before {
                        // Ends when that request's task ends, answered or not.
                        let _ = before.await;
                    }
                    if reply.is_closed() {
                        // The caller is gone (its session ended): nothing was sent yet, and
                        // nobody would learn whether it was.
                        return;
                    }
                    let _ = reply.send(answer.await);
                    drop(done);
                });
            }
            _ => {
                let alias = &account.config.alias;
                let _ = reply.send(Err(ChatError::NotReady(format!(
                    "account {alias:?} is not ready"
                ))));
            }
        }
    }

    fn request(&mut self, name: &'static str, work: impl Future<Output = ()> + Send + 'static) {
        while self.requests.try_join_next().is_some() {}
        // A panic drops the caller's reply, which tells the caller.
        let work = task::watched(name, work, |_| {});
        self.requests.spawn(work.instrument(self.args.span.clone()));
    }
}

/// Turns a classified error into the failure that ends the incarnation.
fn settle(args: &ClientArgs, class: Class) -> Failure {
    let account = &args.account;
    match class {
        Class::Transient(failure) | Class::Fatal(failure) => failure,
        Class::UnknownToken => {
            let dir = account.paths.dir.display();
            if account.config.password.is_none() {
                if account.drift_reported.load(Ordering::Relaxed) {
                    return Failure::fatal(format!(
                        "the homeserver rejected the saved session's access token \
                         (M_UNKNOWN_TOKEN), kept because the configured device_id names another \
                         device; remove {dir} to use the configured access_token and device_id"
                    ));
                }
                return Failure::fatal(format!(
                    "the homeserver rejected the access token (M_UNKNOWN_TOKEN); set a new \
                     access_token (and remove {dir}) or configure a password"
                ));
            }
            if account.relogged_in.swap(true, Ordering::Relaxed) {
                return Failure::fatal(
                    "the homeserver rejected the access token (M_UNKNOWN_TOKEN) again right \
                     after a fresh login"
                        .to_string(),
                );
            }
            if let Err(e) = store::wipe(&account.paths) {
                return Failure::fatal(format!(
                    "the access token was rejected and {dir} cannot be removed: {e}"
                ));
            }
            args.span.in_scope(|| warn!(dir = %dir,
                "The homeserver rejected the access token; the session was discarded and the restart logs in again."));
            Failure::transient("access token rejected (M_UNKNOWN_TOKEN); logging in again")
        }
    }
}

/// Opens the account: restores its session or logs in. Returns the client and whether it
/// resumes an earlier sync.
async fn open(args: &ClientArgs) -> Result<(Client, bool), Failure> {
    let account = &args.account;
    let mut wiped = false;
    loop {
        let why = match try_open(args).await {
            Ok(opened) => return Ok(opened),
            Err(Open::Failed(failure)) => return Err(failure),
            Err(Open::Unusable(why)) => why,
        };
        let dir = account.paths.dir.display();
        if wiped {
            return Err(Failure::fatal(format!(
                "the local Matrix state is unusable even after a fresh login: {why}"
            )));
        }
        if account.config.password.is_none() {
            return Err(Failure::fatal(format!(
                "the local Matrix state is unusable: {why}. Without a password warden cannot \
                 log in fresh: remove {dir} and give a new access_token, or configure a password"
            )));
        }
        warn!(dir = %dir, reason = %why, "The local Matrix state is unusable; wiping it and logging in fresh.");
        store::wipe(&account.paths)
            .map_err(|e| Failure::fatal(format!("cannot remove {dir}: {e}")))?;
        wiped = true;
    }
}

enum Open {
    /// The local state cannot be used (wipe and log in fresh, if possible).
    Unusable(String),
    /// Anything else.
    Failed(Failure),
}

impl From<Class> for Open {
    fn from(class: Class) -> Self {
        match class {
            Class::Transient(f) | Class::Fatal(f) => Open::Failed(f),
            Class::UnknownToken => Open::Failed(Failure::fatal(
                "the homeserver rejected the access token (M_UNKNOWN_TOKEN)",
            )),
        }
    }
}

async fn try_open(args: &ClientArgs) -> Result<(Client, bool), Open> {
    let account = &args.account;
    let config = &account.config;
    let paths = &account.paths;
    match store::inspect(paths, config.user_id.as_deref()) {
        Local::Unusable(why) => Err(Open::Unusable(why)),
        Local::Saved(saved) => {
            let client = build(config, paths).await?;
            // The saved session's device wins over a different configured one: its E2EE
            // keys are that device's, and a token of another device would not match them.
            let drift = config
                .device_id
                .as_ref()
                .filter(|device| **device != saved.device_id);
            if let Some(device) = drift
                && !account.drift_reported.swap(true, Ordering::Relaxed)
            {
                warn!(configured = %device, saved = %saved.device_id,
                    session = %paths.session.display(),
                    "The configured device_id differs from the saved session's device; keeping the saved session and its device (its E2EE keys are that device's). To use the configured device, stop warden and remove the account's directory under state.dir.");
            }
            // A token given in the config wins over the saved one (the operator rotated it),
            // unless it is for another device.
            let token = match &config.access_token {
                Some(token) if config.password.is_none() && drift.is_none() => token.clone(),
                _ => saved.access_token.clone(),
            };
            let session =
                matrix_session(&saved.user_id, &saved.device_id, &token).map_err(Open::Unusable)?;
            client.restore_session(session).await.map_err(|e| match e {
                // The network failing is no sign of a broken store.
                matrix_sdk::Error::Http(_) => Open::from(errors::classify(&e, During::Session)),
                other => Open::Unusable(format!("restoring the session failed: {other}")),
            })?;
            if otk_conflict(&client).await {
                return Err(Open::Unusable(
                    "the crypto store lost one-time keys the homeserver still has (the SDK's \
                     one-time-key-already-uploaded flag is set)"
                        .to_string(),
                ));
            }
            let resumed = matches!(
                client
                    .state_store()
                    .get_kv_data(StateStoreDataKey::SyncToken)
                    .await,
                Ok(Some(_))
            );
            info!(user = %saved.user_id, device = %saved.device_id, resumed, "Restored the Matrix session.");
            Ok((client, resumed))
        }
        Local::Fresh => {
            let opened = fresh(args).await;
            if opened.is_err() {
                // Leave nothing half-made that the next start would take for a broken store.
                let _ = store::wipe(paths);
            }
            opened
        }
    }
}

/// A first start (or one after a wipe): token or password.
async fn fresh(args: &ClientArgs) -> Result<(Client, bool), Open> {
    let account = &args.account;
    let config = &account.config;
    let paths = &account.paths;
    store::create_dir(&paths.dir).map_err(|e| {
        Open::Failed(Failure::fatal(format!(
            "cannot create {}: {e}",
            paths.dir.display()
        )))
    })?;
    let client = build(config, paths).await?;
    let saved = if let Some(token) = &config.access_token
        && config.password.is_none()
    {
        let (user_id, device_id) = match (&config.user_id, &config.device_id) {
            (Some(user), Some(device)) => (user.clone(), device.clone()),
            _ => whoami(config, token).await?,
        };
        let session = matrix_session(&user_id, &device_id, token)
            .map_err(|e| Open::Failed(Failure::fatal(e)))?;
        client.restore_session(session).await.map_err(|e| {
            Open::Failed(Failure::transient(format!(
                "using the access token failed: {e}"
            )))
        })?;
        SavedSession {
            homeserver: config.homeserver.clone(),
            user_id,
            device_id,
            access_token: token.clone(),
        }
    } else {
        login(args, &client).await?
    };
    store::save(paths, &saved).map_err(|e| {
        Open::Failed(Failure::fatal(format!(
            "cannot write {}: {e}",
            paths.session.display()
        )))
    })?;
    Ok((client, false))
}

/// The password login, holding a `matrix_login` slot for the request.
async fn login(args: &ClientArgs, client: &Client) -> Result<SavedSession, Open> {
    let config = &args.account.config;
    let (Some(user), Some(password)) = (&config.user_id, &config.password) else {
        return Err(Open::Failed(Failure::fatal(
            "a password login needs user_id and password",
        )));
    };
    let slot = args
        .slots
        .acquire(LOGIN_POOL, &args.path, args.first_start)
        .await
        .map_err(|e| Open::Failed(Failure::transient(format!("no login slot: {e}"))))?;
    let started = Instant::now();
    let mut login = client
        .matrix_auth()
        .login_username(user, password)
        .initial_device_display_name(&format!("warden {}", config.alias));
    if let Some(device) = &config.device_id {
        // The configured device: its keys are made anew by this login's store.
        login = login.device_id(device);
    }
    let response = login.send().await;
    slot.release();
    let response = response.map_err(|e| Open::from(errors::classify(&e, During::Login)))?;
    info!(user = %response.user_id, device = %response.device_id,
        login_ms = started.elapsed().as_millis() as u64, "Logged in to Matrix.");
    Ok(SavedSession {
        homeserver: config.homeserver.clone(),
        user_id: response.user_id.to_string(),
        device_id: response.device_id.to_string(),
        access_token: response.access_token,
    })
}

/// `GET /account/whoami` for a token without `user_id` or `device_id`.
async fn whoami(config: &AccountConfig, token: &str) -> Result<(String, String), Open> {
    let client = Client::builder()
        .homeserver_url(&config.homeserver)
        .request_config(request_config())
        .build()
        .await
        .map_err(|e| {
            Open::Failed(Failure::transient(format!(
                "cannot reach the homeserver: {e}"
            )))
        })?;
    let session = matrix_session(
        config.user_id.as_deref().unwrap_or("@unknown:unknown"),
        "WHOAMI",
        token,
    )
    .map_err(|e| Open::Failed(Failure::fatal(e)))?;
    // A memory-only client, just to carry the token.
    client
        .matrix_auth()
        .restore_session(session, Default::default())
        .await
        .map_err(|e| Open::Failed(Failure::transient(format!("whoami failed: {e}"))))?;
    let who = client
        .whoami()
        .await
        .map_err(|e| Open::from(errors::classify_http(&e, During::Session)))?;
    let device = who.device_id.ok_or_else(|| {
        Open::Failed(Failure::fatal(
            "whoami did not name the token's device; set device_id",
        ))
    })?;
    Ok((who.user_id.to_string(), device.to_string()))
}

async fn build(config: &AccountConfig, paths: &Paths) -> Result<Client, Open> {
    Client::builder()
        .homeserver_url(&config.homeserver)
        // The configured URL is the one to use: by default the SDK switches to the base URL
        // a login response advertises, which may bypass a proxy the operator put in front.
        .respect_login_well_known(false)
        .sqlite_store(&paths.store, None)
        .request_config(request_config())
        .build()
        .await
        .map_err(|e| match e {
            ClientBuildError::SqliteStore(e) => {
                Open::Unusable(format!("cannot open the store: {e}"))
            }
            ClientBuildError::Http(e) => Open::from(errors::classify_http(&e, During::Session)),
            other => Open::Failed(Failure::transient(format!(
                "cannot set up the client: {other}"
            ))),
        })
}

/// No retries inside the SDK: the supervisor is the retry layer (rate-limited sends are
/// sent again by `unless_rate_limited`).
fn request_config() -> RequestConfig {
    RequestConfig::new()
        .disable_retry()
        .timeout(REQUEST_TIMEOUT)
}

fn matrix_session(user_id: &str, device_id: &str, token: &str) -> Result<MatrixSession, String> {
    let user_id = user_id
        .try_into()
        .map_err(|e| format!("bad user ID {user_id:?}: {e}"))?;
    Ok(MatrixSession {
        meta: SessionMeta {
            user_id,
            device_id: device_id.into(),
        },
        tokens: SessionTokens {
            access_token: token.to_string(),
            refresh_token: None,
        },
    })
}

/// Whether the SDK recorded that the homeserver already had one-time keys this store
/// forgot: the crypto state is then beyond repair.
async fn otk_conflict(client: &Client) -> bool {
    matches!(
        client
            .state_store()
            .get_kv_data(StateStoreDataKey::OneTimeKeyAlreadyUploaded)
            .await,
        Ok(Some(_))
    )
}

/// Where a sync loop starts, from the inbox's position and the session.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resume {
    /// The token the first sync passes; `None` = the SDK's own (or none at all).
    since: Option<String>,
    /// Whether the first sync's messages are forwarded (not on a first start ever).
    forwarding: bool,
    /// Whether the first sync asks for the full state (a fresh session resuming the
    /// inbox's position: its store knows no room yet).
    full_state: bool,
}

impl Resume {
    /// * the inbox holds a position: forward from it; a store that never synced (a fresh
    ///   login, or one cut off before its first sync) asks for the full state with it and
    ///   back-paginates every limited room;
    /// * no position but a store that synced (state from before the inbox): forward from
    ///   the SDK's token;
    /// * neither: a first start ever — learn the state, forward nothing (it is history).
    fn new(position: Option<String>, synced_before: bool) -> Self {
        match position {
            Some(since) => Self {
                since: Some(since),
                forwarding: true,
                full_state: !synced_before,
            },
            None => Self {
                since: None,
                forwarding: synced_before,
                full_state: false,
            },
        }
    }
}

/// Syncs until an error; the first response makes the account ready.
///
/// Each response's forwarded messages and its `next_batch` are committed to the inbox in
/// one transaction before the next sync, which starts from that `next_batch`: the
/// commit-order invariant (`inbox/mod.rs`).
async fn sync_loop(
    client: Client,
    actor: ActorRef<ClientMsg>,
    probe: Probe,
    started: Instant,
    resumed: bool,
    account: Arc<Account>,
) {
    let fail = |class: Class| {
        let _ = actor.send_message(ClientMsg::SyncFailed(class));
    };
    let position = match account.chat.position(&account.config.alias).await {
        Ok(position) => position,
        Err(e) => {
            return fail(Class::Transient(Failure::transient(format!(
                "cannot read the inbox: {e}"
            ))));
        }
    };
    // The SDK saves its sync position while it processes a response, before the inbox
    // commits that response's messages; a crash (or a failed commit) in between leaves the
    // SDK ahead. It would then drop the same response when it comes again ("the same sync
    // response twice"), so what lies between the two positions is read back with
    // `/messages` instead, stored, and the sync goes on from the SDK's position.
    let sdk_token = match client
        .state_store()
        .get_kv_data(StateStoreDataKey::SyncToken)
        .await
    {
        Ok(value) => value.and_then(|v| v.into_sync_token()),
        Err(_) => None,
    };
    // Whether the Matrix store has synced before: its rooms are known.
    let synced_before = sdk_token.is_some();
    let position = match (position, sdk_token) {
        (Some(stored), Some(ahead)) if stored != ahead => {
            warn!(
                "The Matrix store is ahead of the inbox (a sync was cut off before its messages were stored); reading them back."
            );
            let (messages, rooms) = match catch_up(&client, &account, &probe, &ahead, &stored).await
            {
                Ok(read) => read,
                Err(class) => return fail(class),
            };
            info!(
                messages,
                rooms, "Stored what the cut-off sync had received."
            );
            if let Err(e) = store(&account, Vec::new(), &ahead).await {
                return fail(inbox_failed(e));
            }
            Some(ahead)
        }
        (position, _) => position,
    };
    let from_inbox = position.is_some();
    let resume = Resume::new(position, synced_before);
    let Resume {
        mut since,
        mut forwarding,
        full_state,
    } = resume;
    let mut recovery_key = account.config.recovery_key.clone();
    let mut first = true;
    // A room joined since the last sync comes with a limited timeline of its history: that
    // is no gap. Only rooms the account was already in can have one — or, after a fresh
    // session resumed the inbox's position, every room (its store knew none).
    let mut known: HashSet<OwnedRoomId> = client
        .joined_rooms()
        .iter()
        .map(|room| room.room_id().to_owned())
        .collect();
    loop {
        // A first sync of a fresh login only learns the state: one event per room, none
        // forwarded (they are history). Later ones return up to TIMELINE_LIMIT per room.
        let limit = if forwarding { TIMELINE_LIMIT } else { 1 };
        // The first sync of an incarnation does not long-poll: a restarted account is
        // ready as soon as it has caught up, not when a quiet room's 30 s poll runs out.
        let timeout = if first { Duration::ZERO } else { SYNC_TIMEOUT };
        let mut settings = SyncSettings::default()
            .timeout(timeout)
            .filter(filter(limit));
        if let Some(token) = &since {
            settings = settings.token(token.clone());
        }
        if first && full_state {
            settings = settings.full_state(true);
        }
        let response = match client.sync_once(settings).await {
            Ok(response) => response,
            // The homeserver refuses the stored position itself (the alias now names an
            // account elsewhere, the server's database was reset): retrying it would loop
            // forever. It is dropped; the next start resumes from the Matrix store's.
            Err(e) if first && from_inbox && status(&e) == Some(400) => {
                warn!(error = %e, "The homeserver refused the inbox's sync position; dropping it. What arrived since it may not be stored.");
                if let Err(e) = account.chat.forget_position(&account.config.alias).await {
                    return fail(inbox_failed(e));
                }
                return fail(Class::Transient(Failure::transient(format!(
                    "the homeserver refused the stored sync position: {e}"
                ))));
            }
            Err(e) => return fail(errors::classify(&e, During::Session)),
        };
        // The SDK records a one-time-key conflict of the key upload that follows a sync and
        // goes on syncing with a store that can never publish keys again. The restart finds
        // the flag: it wipes the state and logs in fresh with a password, or parks.
        if otk_conflict(&client).await {
            return fail(Class::Transient(Failure::transient(
                "one-time-key conflict while running: the homeserver already has one-time keys \
                 this store made again (the SDK's one-time-key-already-uploaded flag is set)",
            )));
        }
        probe.beat();
        let every_room = first && full_state;
        let messages = if forwarding {
            let read = Inbound {
                client: &client,
                account: &account,
                probe: &probe,
                known: &known,
                every_room,
            };
            match read.collect(&response, since.as_deref()).await {
                Ok(messages) => messages,
                Err(e) => return fail(errors::classify(&e, During::Session)),
            }
        } else {
            Vec::new()
        };
        let next = response.next_batch.clone();
        if let Err(e) = store(&account, messages, &next).await {
            return fail(inbox_failed(e));
        }
        since = Some(next);
        known.extend(response.rooms.joined.keys().cloned());
        forwarding = true;
        if first {
            first = false;
            if let Some(key) = recovery_key.take() {
                recover_if_missing(&account, &client, key);
            }
            probe.set_ready(true);
            let _ = actor.send_message(ClientMsg::Synced);
            info!(
                resumed,
                start_ms = started.elapsed().as_millis() as u64,
                "Matrix account ready."
            );
        }
    }
}

/// Events one back-pagination request asks for.
const BACKFILL_PAGE: u32 = 500;
/// Events a room's back-pagination fetches at most in one sync; older ones are reported
/// as not forwarded.
const BACKFILL_MAX: usize = 100_000;
/// Pages a room's back-pagination asks for at most (twice what [`BACKFILL_MAX`] needs).
const BACKFILL_PAGES: usize = 2 * BACKFILL_MAX / BACKFILL_PAGE as usize;

/// Messages per inbox commit: a long backfill is stored in parts (all but the last
/// without moving the position), with [`PART_PAUSE`] between them, so that sessions
/// reading every event have a moment to take them from the hub. A subscriber that still
/// falls more than the hub's 1,024 events behind is closed with 4001 and resumes with
/// `since`.
const COMMIT_CHUNK: usize = 256;
/// The pause between two parts of a long backfill.
const PART_PAUSE: Duration = Duration::from_millis(5);

/// Stores `messages` and moves the account's sync position to `token`, in parts of
/// [`COMMIT_CHUNK`]: only the last part moves the position.
async fn store(
    account: &Account,
    messages: Vec<NewMessage>,
    token: &str,
) -> Result<(), crate::inbox::InboxError> {
    store_parts(account, messages, Some(token)).await
}

/// [`store`], moving the position only when `token` is given.
async fn store_parts(
    account: &Account,
    messages: Vec<NewMessage>,
    token: Option<&str>,
) -> Result<(), crate::inbox::InboxError> {
    let alias = &account.config.alias;
    let mut parts: Vec<Vec<NewMessage>> = Vec::new();
    let mut rest = messages.into_iter().peekable();
    while rest.peek().is_some() {
        parts.push(rest.by_ref().take(COMMIT_CHUNK).collect());
    }
    let last = parts.pop().unwrap_or_default();
    for part in parts {
        account.chat.commit(alias, part, None).await?;
        tokio::time::sleep(PART_PAUSE).await;
    }
    if last.is_empty() && token.is_none() {
        return Ok(());
    }
    account
        .chat
        .commit(alias, last, token.map(str::to_string))
        .await
}

fn inbox_failed(e: crate::inbox::InboxError) -> Class {
    Class::Transient(Failure::transient(format!(
        "cannot store messages in the inbox: {e}"
    )))
}

/// Reads back the messages of every room the account is or was in between the sync
/// positions `to` (the inbox's, older) and `from` (the SDK's, newer) with `/messages`, and
/// stores them (without moving the position: the caller does). A room the homeserver
/// refuses (4xx: purged, banned) is skipped with a WARN naming it; any other failure ends
/// the incarnation, and the next one starts over (what was stored stays, once).
///
/// A room joined within that window is read from the inbox's position, not from the join:
/// its history there may be stored — a repeat of history is preferred to a lost message.
async fn catch_up(
    client: &Client,
    account: &Account,
    probe: &Probe,
    from: &str,
    to: &str,
) -> Result<(usize, usize), Class> {
    let mut stored = 0;
    let rooms: Vec<Room> = client
        .rooms()
        .into_iter()
        .filter(|room| matches!(room.state(), RoomState::Joined | RoomState::Left))
        .collect();
    let read_back = rooms.len();
    for room in rooms {
        let (events, complete) = match backfill(&room, from, to, probe).await {
            Ok(read) => read,
            Err(e) if refused(&e) => {
                warn!(room = %room.room_id(), error = %e,
                    "The homeserver refused to read back a room; what it received in the cut-off sync was not stored.");
                continue;
            }
            Err(e) => return Err(errors::classify(&e, During::Session)),
        };
        if !complete {
            warn!(room = %room.room_id(), limit = BACKFILL_MAX,
                "More messages than the account reads back were cut off; the older ones were not stored.");
        }
        let read = Inbound {
            client,
            account,
            probe,
            known: &HashSet::new(),
            every_room: false,
        };
        let messages = read.messages(&room, events, false).await;
        stored += messages.len();
        store_parts(account, messages, None)
            .await
            .map_err(inbox_failed)?;
    }
    Ok((stored, read_back))
}

/// A client error (4xx) other than a rate limit: asking again will not help.
fn refused(e: &matrix_sdk::Error) -> bool {
    status(e).is_some_and(|status| (400..500).contains(&status) && status != 429)
}

/// The HTTP status of the homeserver's error answer, if it gave one.
fn status(e: &matrix_sdk::Error) -> Option<u16> {
    e.as_client_api_error().map(|api| api.status_code.as_u16())
}

/// Reads the messages to store out of sync responses.
struct Inbound<'a> {
    client: &'a Client,
    account: &'a Account,
    probe: &'a Probe,
    /// Rooms the account was in before this response.
    known: &'a HashSet<OwnedRoomId>,
    /// Back-paginate every limited room (a fresh session resuming the inbox's position).
    every_room: bool,
}

impl Inbound<'_> {
    /// The messages of `response` to store (rooms joined, and rooms left since `since`),
    /// per room in timeline order: for a room whose timeline is limited (more arrived than one sync returns) and that the account
    /// already knew (or `every_room`), the events between `since` and the timeline first,
    /// fetched with `/messages` back from the timeline's `prev_batch` to `since`.
    async fn collect(
        &self,
        response: &SyncResponse,
        since: Option<&str>,
    ) -> Result<Vec<NewMessage>, matrix_sdk::Error> {
        let mut messages = Vec::new();
        // Rooms left (or been kicked from) since `since` too: what was sent before the
        // leave was sent to the account.
        let timelines = (response.rooms.joined.iter())
            .map(|(room_id, update)| (room_id, &update.timeline))
            .chain(
                (response.rooms.left.iter()).map(|(room_id, update)| (room_id, &update.timeline)),
            );
        for (room_id, timeline) in timelines {
            let Some(room) = self.client.get_room(room_id) else {
                warn!(room = %room_id, "A synced room is unknown to the Matrix store; its messages were not stored.");
                continue;
            };
            let known = self.known.contains(room_id);
            let mut events: Vec<Raw<AnySyncTimelineEvent>> = Vec::new();
            if timeline.limited && (self.every_room || known) {
                match (&timeline.prev_batch, since) {
                    (Some(from), Some(to)) => {
                        let (older, complete) = backfill(&room, from, to, self.probe).await?;
                        info!(room = %room_id, events = older.len(),
                            "Fetched what arrived in a room beyond one sync's limit.");
                        if !complete {
                            warn!(room = %room_id, limit = BACKFILL_MAX,
                                "More messages arrived while the account was away than it fetches back; the older ones were not stored.");
                        }
                        events = older;
                    }
                    _ => {
                        warn!(room = %room_id, limit = TIMELINE_LIMIT,
                            "More messages arrived while the account was away than one sync returns, and the server gave no way back; the older ones were not stored.");
                    }
                }
            }
            events.extend(timeline.events.iter().map(|e| e.raw().clone()));
            // A room just joined comes with its history, which is not for the agent.
            messages.extend(self.messages(&room, events, !known).await);
        }
        Ok(messages)
    }

    /// The messages to store among `events` of `room`; with `new_room`, not those sent
    /// before the account joined.
    async fn messages(
        &self,
        room: &Room,
        events: Vec<Raw<AnySyncTimelineEvent>>,
        new_room: bool,
    ) -> Vec<NewMessage> {
        let mut messages = Vec::new();
        let mut undecryptable = 0;
        let view = RoomView::of(self.client, room).await;
        for raw in events {
            let ev = match raw.deserialize() {
                Ok(AnySyncTimelineEvent::MessageLike(AnySyncMessageLikeEvent::RoomMessage(
                    SyncMessageLikeEvent::Original(ev),
                ))) => ev,
                Ok(AnySyncTimelineEvent::MessageLike(AnySyncMessageLikeEvent::RoomEncrypted(
                    _,
                ))) => {
                    undecryptable += 1;
                    continue;
                }
                _ => continue,
            };
            if new_room && before_own_join(self.client, room, &ev).await {
                continue;
            }
            if let Some(message) = forward(self.account, self.client, room, ev, &view) {
                messages.push(message);
            }
        }
        if undecryptable > 0 {
            warn!(room = %room.room_id(), events = undecryptable,
                "Encrypted messages this device cannot decrypt (no room key) were not stored.");
        }
        messages
    }
}

/// The events of `room` between `to` (a sync position) and `from` (a timeline's
/// `prev_batch`, or a newer sync position), oldest first; and whether they are all there
/// (not cut at [`BACKFILL_MAX`]). Beats `probe` on every page: a long back-pagination is
/// progress, not a hang.
async fn backfill(
    room: &Room,
    from: &str,
    to: &str,
    probe: &Probe,
) -> Result<(Vec<Raw<AnySyncTimelineEvent>>, bool), matrix_sdk::Error> {
    let mut events = Vec::new();
    let mut from = from.to_string();
    // A server that keeps answering empty pages with new tokens is not followed forever.
    for _ in 0..BACKFILL_PAGES {
        let mut options = MessagesOptions::backward().from(from.as_str());
        options.to = Some(to.to_string());
        options.limit = UInt::from(BACKFILL_PAGE);
        let page = room.messages(options).await?;
        probe.beat();
        events.extend(page.chunk.into_iter().map(|e| e.into_raw()));
        if events.len() >= BACKFILL_MAX {
            events.truncate(BACKFILL_MAX);
            events.reverse();
            return Ok((events, false));
        }
        // No `end`: nothing more. An empty page with an `end` is not the end (the server
        // may have filtered a whole page out); the same `end` again would be.
        match page.end {
            Some(end) if end != from => from = end,
            _ => {
                events.reverse();
                return Ok((events, true));
            }
        }
    }
    events.reverse();
    Ok((events, false))
}

/// Once the client is ready, on every start: when the account's secrets (cross-signing
/// keys, the key-backup key) are missing from the local store, imports them with the
/// configured recovery key, in a task of the account that the next incarnation's replaces:
/// best-effort, logged either way, the key never.
fn recover_if_missing(account: &Arc<Account>, client: &Client, key: String) {
    let client = client.clone();
    let owner = account.clone();
    let task = async move {
        let encryption = client.encryption();
        // The state below is computed by the SDK's start-up task (it reads account data).
        encryption.wait_for_e2ee_initialization_tasks().await;
        let cross_signing = encryption
            .cross_signing_status()
            .await
            .is_some_and(|s| s.is_complete());
        let missing = match encryption.recovery().state() {
            RecoveryState::Enabled => false,
            RecoveryState::Incomplete => true,
            RecoveryState::Disabled => {
                if !owner.no_storage_reported.swap(true, Ordering::Relaxed) {
                    warn!(
                        "recovery_key is set, but the account has no secret storage: there is nothing to recover."
                    );
                }
                false
            }
            // The check could not be made (the homeserver did not answer): go by the
            // cross-signing keys, which the local store knows.
            RecoveryState::Unknown => !cross_signing,
        };
        if missing {
            match encryption.recovery().recover(&key).await {
                Ok(()) => info!("Recovered the account's secrets with the recovery key."),
                Err(e) => {
                    let (step, error) = recovery_failure(&e);
                    warn!(step, error = %error, "Could not recover the account's secrets with the recovery key; encrypted history stays unreadable until it is fixed.");
                }
            }
        } else {
            debug!(
                cross_signing,
                "The account's secrets are here; no recovery needed."
            );
        }
    };
    let report = |ended: task::Ended| {
        if ended.panicked() {
            warn!(error = %ended, "The recovery task failed.");
        }
    };
    let task = task::spawn("recovery", tracing::Span::current(), task, report);
    *account.recovery.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
}

/// Which step of a recovery failed, and the error in words that never hold the key: a key
/// that does not decode or check says only so (the decoder's own message quotes parts of
/// it).
fn recovery_failure(e: &RecoveryError) -> (&'static str, String) {
    let storage = match e {
        RecoveryError::SecretStorage(storage) => storage,
        RecoveryError::Sdk(e) => return ("updating the recovery state", e.to_string()),
        other => return ("recovering", other.to_string()),
    };
    match storage {
        SecretStorageError::SecretStorageKey(_) => (
            "checking the recovery key",
            "the recovery key is wrong or malformed".to_string(),
        ),
        SecretStorageError::MissingKeyInfo { .. } => {
            ("reading the secret storage key's info", storage.to_string())
        }
        SecretStorageError::Sdk(_) | SecretStorageError::Json(_) => {
            ("reading the account data", storage.to_string())
        }
        SecretStorageError::ImportError { .. } => ("importing a secret", storage.to_string()),
        SecretStorageError::Decryption(_) => ("decrypting a secret", storage.to_string()),
        SecretStorageError::Storage(_) => ("storing the secrets", storage.to_string()),
        SecretStorageError::Verification(_) => ("signing this device", storage.to_string()),
        SecretStorageError::InconsistentBackupDecryptionKey
        | SecretStorageError::MissingOrInvalidBackupDecryptionKey => {
            ("enabling the key backup", storage.to_string())
        }
    }
}

fn filter(limit: u32) -> SyncFilter {
    let mut filter = FilterDefinition::with_lazy_loading();
    filter.room.timeline.limit = Some(UInt::from(limit));
    SyncFilter::FilterDefinition(filter)
}

/// Accepts allowed invites and hands approvers' reactions on.
fn add_handlers(client: &Client, account: &Arc<Account>) {
    let on_invite = {
        let account = account.clone();
        move |ev: StrippedRoomMemberEvent, room: Room, client: Client| {
            let account = account.clone();
            async move {
                let own = client.user_id().is_some_and(|me| me == ev.state_key);
                if !own || ev.content.membership != MembershipState::Invite {
                    return;
                }
                let sender = ev.sender.as_str();
                if !account.config.auto_join || !account.filter.sender_allowed(sender) {
                    debug!(room = %room.room_id(), sender, "Ignoring an invite.");
                    return;
                }
                // Joining waits on the homeserver: not inside the sync.
                account.spawn("join", async move {
                    match room.join().await {
                        Ok(()) => {
                            info!(room = %room.room_id(), sender = %ev.sender, "Joined a room on invite.")
                        }
                        Err(e) => {
                            warn!(room = %room.room_id(), error = %e, "Could not join a room on invite.")
                        }
                    }
                });
            }
        }
    };
    client.add_event_handler(on_invite);

    let on_reaction = {
        let account = account.clone();
        move |ev: OriginalSyncReactionEvent, room: Room| {
            let account = account.clone();
            async move {
                let sender = ev.sender.as_str();
                let annotation = &ev.content.relates_to;
                let approve = match annotation.key.as_str() {
                    k if k.starts_with('✅') => true,
                    k if k.starts_with('❌') => false,
                    _ => return,
                };
                if !account.is_approver(sender) {
                    return;
                }
                // The broker takes it only on a request message this approver was sent.
                let decision = Decision {
                    id: None,
                    approve,
                    by: sender.to_string(),
                    room_id: room.room_id().to_string(),
                    event_id: ev.event_id.to_string(),
                    relates_to: Some(annotation.event_id.to_string()),
                };
                if !account.decide(decision) {
                    warn!(
                        sender,
                        "An approver reacted, but no approval handler is running."
                    );
                }
            }
        }
    };
    client.add_event_handler(on_reaction);
}

/// `approve <id>` / `deny <id>` (any case, surrounding space ignored) → (approve, id); a
/// reply may leave the id out (`approve` / `deny`): it then names the request replied to.
/// The quoted fallback of a reply (`> ` lines, then an empty one) is skipped.
fn approval_command(body: &str, reply: bool) -> Option<(bool, Option<&str>)> {
    let mut text = body;
    if reply && text.starts_with("> ") {
        text = text.split_once("\n\n").map_or("", |(_, rest)| rest);
    }
    let mut words = text.split_whitespace();
    let verb = words.next()?;
    let id = words.next();
    if words.next().is_some() {
        return None;
    }
    let approve = if verb.eq_ignore_ascii_case("approve") {
        true
    } else if verb.eq_ignore_ascii_case("deny") {
        false
    } else {
        return None;
    };
    match id {
        Some(id) if id.len() == 8 && id.chars().all(|c| c.is_ascii_alphanumeric()) => {
            Some((approve, Some(id)))
        }
        Some(_) => None,
        None if reply => Some((approve, None)),
        None => None,
    }
}

/// Sends `request` to each of `approvers` in a direct message (made on first use, reused
/// after): per approver, where it went or why not.
async fn notify(
    client: &Client,
    account: &Account,
    request: &ApprovalRequest,
    approvers: Vec<String>,
) -> Vec<(String, Result<Delivered, String>)> {
    let _one_at_a_time = account.notifying.lock().await;
    let args = match &request.args {
        Value::Array(items) if !items.is_empty() => {
            let words: Vec<String> = items
                .iter()
                .map(|a| a.as_str().map_or_else(|| a.to_string(), str::to_string))
                .collect();
            format!(" {}", words.join(" "))
        }
        Value::Null => String::new(),
        Value::Array(_) => String::new(),
        other => format!(" {other}"),
    };
    let id = &request.id;
    let reason = if request.reason.is_empty() {
        String::new()
    } else {
        format!("\nReason: {}", request.reason)
    };
    let body = format!(
        "Approval {id}: run `{}{args}` on node {}?{reason}\nReply `approve {id}` or `deny {id}`, \
         or react ✅ / ❌ to this message.",
        request.command, request.node
    );
    let mut sent = Vec::new();
    for approver in approvers {
        // One transaction per approval and approver: sent again (a restart between the send
        // and the broker's record), the homeserver answers with the first event.
        let txn = format!("warden.approval.{id}.{}", approver.to_lowercase());
        let within = account.config.send_retry_within;
        let result = notify_one(client, account, &approver, &body, &txn, within).await;
        if let Err(e) = &result {
            warn!(id = %id, approver = %approver, error = %e, "Could not notify an approver.");
        }
        sent.push((approver, result));
    }
    sent
}

async fn notify_one(
    client: &Client,
    account: &Account,
    approver: &str,
    body: &str,
    txn: &str,
    within: Duration,
) -> Result<Delivered, String> {
    let user = OwnedUserId::try_from(approver).map_err(|e| e.to_string())?;
    let made = account
        .dm_rooms
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&approver.to_lowercase())
        .and_then(|id| client.get_room(id));
    let room = match client.get_dm_room(&user).or(made) {
        Some(room) => room,
        None => {
            let room = client.create_dm(&user).await.map_err(|e| e.to_string())?;
            info!(approver, room = %room.room_id(), "Opened a direct message with an approver.");
            account
                .dm_rooms
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(approver.to_lowercase(), room.room_id().to_owned());
            room
        }
    };
    let content = RoomMessageEventContent::text_plain(body);
    let txn = Some(OwnedTransactionId::from(txn));
    let event_id = post(&room, content, txn, (within, Instant::now(), "approval DM"))
        .await
        .map_err(|e| e.to_string())?;
    Ok(Delivered {
        room_id: room.room_id().to_string(),
        event_id,
    })
}

/// Whether `ev` predates the account's own join: the history a newly joined room comes
/// with, not a message to act on.
async fn before_own_join(client: &Client, room: &Room, ev: &OriginalSyncRoomMessageEvent) -> bool {
    let Some(me) = client.user_id() else {
        return false;
    };
    match room.get_member_no_sync(me).await {
        Ok(Some(member)) => member
            .event()
            .origin_server_ts()
            .is_some_and(|joined| ev.origin_server_ts < joined),
        _ => false,
    }
}

/// What an allowed message becomes; an approver's `approve <id>` / `deny <id>` is handed
/// to the approval handler instead.
fn forward(
    account: &Account,
    client: &Client,
    room: &Room,
    ev: OriginalSyncRoomMessageEvent,
    view: &RoomView,
) -> Option<NewMessage> {
    if client.user_id().is_some_and(|me| me == ev.sender) {
        return None;
    }
    let room_id = room.room_id().as_str();
    let sender = ev.sender.as_str();
    let replied_to = match &ev.content.relates_to {
        Some(Relation::Reply(reply)) => Some(reply.in_reply_to.event_id.to_string()),
        _ => None,
    };
    if let MessageType::Text(text) = &ev.content.msgtype
        && let Some((approve, id)) = approval_command(&text.body, replied_to.is_some())
    {
        if account.is_approver(sender) {
            // The broker takes it only in the room where this approver was asked.
            let decision = Decision {
                id: id.map(str::to_string),
                approve,
                by: sender.to_string(),
                room_id: room_id.to_string(),
                event_id: ev.event_id.to_string(),
                relates_to: if id.is_none() { replied_to } else { None },
            };
            if !account.decide(decision) {
                warn!(
                    id,
                    sender, "An approver answered, but no approval handler is running."
                );
            }
        } else {
            debug!(
                id,
                sender,
                room = room_id,
                "Ignoring an approval answer from someone who is not an approver."
            );
        }
        return None;
    }
    if !account.filter.room_allowed(room_id) || !account.filter.sender_allowed(sender) {
        debug!(
            room = room_id,
            sender, "Not forwarding a message: room or sender not allowed."
        );
        return None;
    }
    let body = match &ev.content.msgtype {
        MessageType::Text(text) => text.body.clone(),
        MessageType::Emote(emote) => emote.body.clone(),
        _ => return None,
    };
    let thread_root = match &ev.content.relates_to {
        Some(Relation::Replacement(_)) => return None,
        Some(Relation::Thread(thread)) => Some(thread.event_id.to_string()),
        _ => None,
    };
    let mentioned = view.mentions_me(&ev, &body);
    if account.config.mention_only && !view.direct && !mentioned {
        debug!(
            room = room_id,
            sender, "Not forwarding a message: mention_only, and it does not mention the account."
        );
        return None;
    }
    Some(NewMessage {
        account: account.config.alias.clone(),
        room_id: room_id.to_string(),
        sender: sender.to_string(),
        event_id: ev.event_id.to_string(),
        body,
        thread_root,
        origin_ts_ms: u64::from(ev.origin_server_ts.0),
        is_direct: view.direct,
        mentioned,
    })
}

/// What the messages of one room share: whether it is a direct chat, and how the account
/// is known there (for mentions).
struct RoomView {
    /// Marked direct (`m.direct`), or of two members at most (joined and invited).
    direct: bool,
    /// The account's user ID.
    me: Option<OwnedUserId>,
    /// The account's display name in the room, if it has one.
    name: Option<String>,
}

impl RoomView {
    async fn of(client: &Client, room: &Room) -> Self {
        let members = room.joined_members_count() + room.invited_members_count();
        let direct = members <= 2 || room.is_direct().await.unwrap_or(false);
        let me = client.user_id().map(ToOwned::to_owned);
        let name = match &me {
            Some(me) => room
                .get_member_no_sync(me)
                .await
                .ok()
                .flatten()
                .and_then(|m| m.display_name().map(str::to_string)),
            None => None,
        };
        Self { direct, me, name }
    }

    /// Whether `ev` (whose text is `body`) mentions the account: in `m.mentions`, by its
    /// user ID, or by its display name (case-insensitive).
    fn mentions_me(&self, ev: &OriginalSyncRoomMessageEvent, body: &str) -> bool {
        let Some(me) = &self.me else {
            return false;
        };
        let listed = ev
            .content
            .mentions
            .as_ref()
            .is_some_and(|m| m.user_ids.contains(me));
        let by_name = self
            .name
            .as_deref()
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .is_some_and(|name| body.to_lowercase().contains(&name.to_lowercase()));
        listed || body.contains(me.as_str()) || by_name
    }
}

/// The joined room `room_id` of `account`, if it may act there (`allowed_rooms`).
fn joined_room(client: &Client, account: &Account, room_id: &str) -> Result<Room, ChatError> {
    let room_id = OwnedRoomId::try_from(room_id)
        .map_err(|e| ChatError::BadRequest(format!("bad room_id {room_id:?}: {e}")))?;
    if !account.filter.room_allowed(room_id.as_str()) {
        return Err(ChatError::Forbidden(format!(
            "room {room_id} is not in allowed_rooms of account {:?}",
            account.config.alias
        )));
    }
    client
        .get_room(&room_id)
        .filter(|room| room.state() == RoomState::Joined)
        .ok_or_else(|| {
            ChatError::Forbidden(format!(
                "account {:?} is not in room {room_id}",
                account.config.alias
            ))
        })
}

/// A failed request to the homeserver, as the caller is told.
fn request_failed(e: &matrix_sdk::Error) -> ChatError {
    match errors::classify(e, During::Session) {
        _ if e
            .as_client_api_error()
            .is_some_and(|api| api.status_code.as_u16() == 403) =>
        {
            ChatError::Forbidden(format!("the homeserver refused it: {e}"))
        }
        Class::Transient(f) | Class::Fatal(f) => ChatError::Failed(f.reason),
        Class::UnknownToken => ChatError::Failed("the access token was rejected".to_string()),
    }
}

/// Posts `content` to `room` (with transaction ID `txn` when given, else a new one per
/// try) through [`unless_rate_limited`], sends counted from `since`, logged as `what`;
/// the event ID.
async fn post<C>(
    room: &Room,
    content: C,
    txn: Option<OwnedTransactionId>,
    (within, since, what): (Duration, Instant, &str),
) -> Result<String, ChatError>
where
    C: MessageLikeEventContent + Clone,
{
    let sent = unless_rate_limited(within, since, what, || {
        let sending = room.send(content.clone());
        match &txn {
            Some(txn) => sending.with_transaction_id(txn.clone()),
            None => sending,
        }
        .into_future()
    })
    .await?;
    Ok(sent.response.event_id.to_string())
}

/// The least wait between two tries of a rate-limited send.
const MIN_RATE_LIMIT_WAIT: Duration = Duration::from_millis(50);

/// Runs `send` again after each rate limit (429) of the homeserver, once its `retry_after`
/// is over (1 s when it names none), while that stays within `within` of the first try;
/// then fails with `rate_limited`, naming `matrix.send_retry_within_ms`. Any other error
/// is the request's.
async fn unless_rate_limited<T, Fut>(
    within: Duration,
    since: Instant,
    what: &str,
    mut send: impl FnMut() -> Fut,
) -> Result<T, ChatError>
where
    Fut: Future<Output = Result<T, matrix_sdk::Error>>,
{
    let mut limited = 0;
    loop {
        let e = match send().await {
            Ok(sent) => return Ok(sent),
            Err(e) => e,
        };
        let Some(hint) = errors::rate_limit(&e) else {
            return Err(request_failed(&e));
        };
        limited += 1;
        // At least a moment between tries, whatever the server says.
        let wait = hint
            .unwrap_or(Duration::from_secs(1))
            .max(MIN_RATE_LIMIT_WAIT);
        if since.elapsed() + wait > within {
            return Err(ChatError::RateLimited(format!(
                "the homeserver rate-limited the send {limited} times; the next try would be \
                 past matrix.send_retry_within_ms ({} ms)",
                within.as_millis()
            )));
        }
        info!(
            retry_after_ms = wait.as_millis() as u64,
            send = what,
            "Rate limited by the homeserver; sending again after its retry_after."
        );
        tokio::time::sleep(wait).await;
    }
}

/// `chat.react`, `chat.edit` and `chat.typing` through `client`: the event ID of the
/// reaction or the edit; none for a typing notice.
async fn act(
    client: &Client,
    account: &Account,
    action: ChatAction,
    since: Instant,
) -> Result<Option<String>, ChatError> {
    let event_id = |id: &str| {
        OwnedEventId::try_from(id)
            .map_err(|e| ChatError::BadRequest(format!("bad event_id {id:?}: {e}")))
    };
    let within = account.config.send_retry_within;
    match action {
        ChatAction::React(p) => {
            let room = joined_room(client, account, &p.room_id)?;
            let content = ReactionEventContent::new(Annotation::new(event_id(&p.event_id)?, p.key));
            let sent = post(&room, content, None, (within, since, "chat.react")).await?;
            Ok(Some(sent))
        }
        ChatAction::Edit(p) => {
            let room = joined_room(client, account, &p.room_id)?;
            let content = text(p.body, p.format)
                .make_replacement(ReplacementMetadata::new(event_id(&p.event_id)?, None));
            let sent = post(&room, content, None, (within, since, "chat.edit")).await?;
            Ok(Some(sent))
        }
        ChatAction::Typing(p) => {
            let room = joined_room(client, account, &p.room_id)?;
            let user_id = client
                .user_id()
                .ok_or_else(|| ChatError::NotReady("the account has no session".to_string()))?
                .to_owned();
            let state = if p.typing {
                let ms = p.timeout_ms.unwrap_or(DEFAULT_TYPING_TIMEOUT_MS);
                Typing::Yes(TypingInfo::new(Duration::from_millis(ms)))
            } else {
                Typing::No
            };
            let request =
                create_typing_event::v3::Request::new(user_id, room.room_id().to_owned(), state);
            unless_rate_limited(within, since, "chat.typing", || async {
                let sent = client.send(request.clone()).await;
                sent.map_err(|e| matrix_sdk::Error::Http(Box::new(e)))
            })
            .await?;
            Ok(None)
        }
    }
}

/// A text message of `body` read as `format`: Markdown gets an HTML `formatted_body` when
/// it formats anything (the Markdown stays the plain `body`).
fn text(body: String, format: Format) -> RoomMessageEventContent {
    match format {
        Format::Markdown => RoomMessageEventContent::text_markdown(body),
        Format::Plain => RoomMessageEventContent::text_plain(body),
    }
}

/// `chat.send` through `client`.
async fn send(
    client: &Client,
    account: &Account,
    params: SendParams,
    since: Instant,
) -> Result<String, ChatError> {
    let room = joined_room(client, account, &params.room_id)?;
    let mut content = text(params.body, params.format);
    if let Some(root) = params.thread_root {
        let root = OwnedEventId::try_from(root.as_str())
            .map_err(|e| ChatError::BadRequest(format!("bad thread_root {root:?}: {e}")))?;
        content.relates_to = Some(Relation::Thread(Thread::plain(root.clone(), root)));
    }
    // The homeserver keeps one event per transaction ID of a device: a retry after a lost
    // answer (or a restart) does not post twice. A rate-limited send was not taken, so
    // without one each try gets its own.
    let txn = params
        .txn_id
        .as_ref()
        .map(|txn_id| OwnedTransactionId::from(format!("warden.{txn_id}")));
    // Logged with a rate limit: the caller's txn_id tells its sends apart.
    let what = params.txn_id.as_deref().unwrap_or("chat.send");
    let within = account.config.send_retry_within;
    post(&room, content, txn, (within, since, what)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 429 `M_LIMIT_EXCEEDED` answer with `retry_after`.
    fn limited(retry_after: Duration) -> matrix_sdk::Error {
        use matrix_sdk::reqwest::StatusCode;
        use matrix_sdk::ruma::api::client::uiaa::UiaaResponse;
        use matrix_sdk::ruma::api::error::{
            ErrorBody, ErrorKind, FromHttpResponseError, LimitExceededErrorData, RetryAfter,
            StandardErrorBody,
        };
        let mut data = LimitExceededErrorData::new();
        data.retry_after = Some(RetryAfter::Delay(retry_after));
        let body = ErrorBody::Standard(StandardErrorBody::new(
            ErrorKind::LimitExceeded(data),
            "slow down".to_string(),
        ));
        let error = UiaaResponse::MatrixError(body.into_error(StatusCode::TOO_MANY_REQUESTS));
        let http = matrix_sdk::HttpError::Api(Box::new(FromHttpResponseError::Server(error)));
        matrix_sdk::Error::Http(Box::new(http))
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limited_send_waits_each_retry_after_within_the_limit_then_names_it() {
        // Two 429s of 1.5 s, then the send goes through: 3 s after the first try.
        let start = tokio::time::Instant::now();
        let mut tries = 0;
        let sent = unless_rate_limited(
            Duration::from_secs(30),
            tokio::time::Instant::now(),
            "test",
            || {
                tries += 1;
                let answer = if tries <= 2 {
                    Err(limited(Duration::from_millis(1500)))
                } else {
                    Ok(tries)
                };
                async move { answer }
            },
        )
        .await;
        assert_eq!(sent, Ok(3));
        assert_eq!(start.elapsed(), Duration::from_secs(3));

        // Past matrix.send_retry_within_ms it fails at once, naming the key; nothing waits
        // beyond it.
        let start = tokio::time::Instant::now();
        let mut tries = 0;
        let failed = unless_rate_limited(
            Duration::from_secs(2),
            tokio::time::Instant::now(),
            "test",
            || {
                tries += 1;
                async { Err::<(), _>(limited(Duration::from_millis(1500))) }
            },
        )
        .await;
        assert_eq!(tries, 2, "one wait fits in 2 s, a second does not");
        assert_eq!(start.elapsed(), Duration::from_millis(1500));
        let Err(ChatError::RateLimited(message)) = failed else {
            panic!("{failed:?}");
        };
        assert!(
            message.contains("matrix.send_retry_within_ms (2000 ms)"),
            "{message}"
        );
        assert_eq!(ChatError::RateLimited(message).code(), "rate_limited");
    }

    #[test]
    fn the_inbox_position_wins_and_a_first_start_ever_forwards_nothing() {
        let stored = Some("s42".to_string());
        assert_eq!(
            Resume::new(stored.clone(), true),
            Resume {
                since: stored.clone(),
                forwarding: true,
                full_state: false
            },
            "a restart resumes from the inbox's position"
        );
        assert_eq!(
            Resume::new(stored.clone(), false),
            Resume {
                since: stored,
                forwarding: true,
                full_state: true
            },
            "a store that never synced (after a wipe) resumes the inbox's position with the full state"
        );
        assert_eq!(
            Resume::new(None, true),
            Resume {
                since: None,
                forwarding: true,
                full_state: false
            },
            "a store that synced before the inbox existed resumes from the SDK's token"
        );
        assert_eq!(
            Resume::new(None, false),
            Resume {
                since: None,
                forwarding: false,
                full_state: false
            },
            "a store that never synced, without a position, learns the state and forwards no history"
        );
    }
}
