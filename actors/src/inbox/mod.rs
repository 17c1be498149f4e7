//! The inbox: every inbound chat message, stored durably before the sync position that
//! produced it moves on, replayed to operators that were away, and the record that makes
//! `chat.send` with a `txn_id` idempotent.
//!
//! ## The commit-order invariant
//! An account's messages and the sync position they came from are written in **one**
//! SQLite transaction ([`Inbox::commit`]) — a long backfill in several, only the last of
//! which moves the position — and the next sync starts from the position the inbox holds
//! ([`Inbox::position`]). (Where the Matrix SDK's own saved position is ahead
//! of it — a crash between the SDK's write and this commit — the account reads the
//! difference back with `/messages` first: `matrix/client.rs`, `catch_up`.) So:
//! * a crash before the commit loses nothing: the next incarnation syncs again from the
//!   old position and gets the same events, which are stored once (`UNIQUE (account,
//!   event_id)`);
//! * a crash after the commit re-delivers nothing: the position already covers them;
//! * an operator sees a message only after it is stored: `chat.message` is published on
//!   the hub by the writer, after the commit, in cursor order.
//!
//! ## Cursors
//! One global sequence, not one per account: each stored message gets the next cursor
//! (SQLite `AUTOINCREMENT`, so a cursor is never given twice, even after trimming). A
//! consumer needs one number to say how far it has read across every account.
//!
//! ## Replay, consumers, retention
//! `subscribe {events: ["chat.message"], since: CURSOR | "earliest"}` or `{…, consumer:
//! NAME}` makes the session read [`Inbox::page`]s after its position, then go live (see
//! `gateway/session/replay.rs` for the seam). `chat.ack {consumer, cursor}` moves a
//! consumer forward ([`Inbox::ack`]), never back. Messages older than
//! `inbox.retention_ms` or beyond `inbox.max_messages_per_account` are trimmed; the
//! highest trimmed cursor of each account is kept, so a reader whose position is below it
//! gets `chat.gap {account, from, to}` before its next message.
//!
//! ## Bounds
//! | what | limit | error |
//! |---|---|---|
//! | messages kept per account | `inbox.max_messages_per_account` (100,000) | trimmed, `chat.gap` |
//! | age of a message | `inbox.retention_ms` (7 days) | trimmed, `chat.gap` |
//! | durable consumers | `inbox.max_consumers` (64); one unused (no subscribe, no ack) for `inbox.retention_ms` is forgotten | `too_large` |
//! | `chat.send` records | `inbox.retention_ms`, and the newest `max_messages_per_account` per account | (forgotten) |
//! | consumer name | 1..=64 of `A-Z a-z 0-9 . _ -` | `bad_request` |
//! | `txn_id` | 1..=64 of `A-Z a-z 0-9 . _ ~ -` | `bad_request` |
//! | requests waiting for the writer | [`QUEUE`], half of it for all but the accounts' commits | `busy` |
//!
//! ## The writer
//! One thread owns the SQLite connection (WAL, `synchronous = FULL`). It takes every
//! request queued since its last batch, runs the writes of all of them in one transaction
//! (one fsync for many commits), answers, then publishes the new messages. It is a plain
//! thread, not a supervised actor: it holds no state beyond the file. A request that fails
//! (disk full, file unreadable) fails its caller — a Matrix account's incarnation then
//! ends as a transient failure and its supervisor retries it, from the old position; a
//! batch that panics fails its callers the same way, and the writer reopens the file.
//!
//! The file is created 0600 (SQLite gives its `-wal` and `-shm` files the same mode): it
//! holds people's messages in clear text.

mod store;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::oneshot;
use tracing::{error, info};

use crate::gateway::chat::{ChatMessage, MESSAGE_EVENT};
use crate::gateway::hub::Hub;
use store::Store;

/// The inbox's file name under `state.dir`.
pub const FILE: &str = "inbox.sqlite3";
/// Requests that may wait for the writer; more are refused with `busy`.
pub const QUEUE: usize = 4096;
/// Requests the writer takes into one transaction at most.
const BATCH: usize = 512;
/// How often the writer wakes when idle, and trims by age at most.
const REFRESH: Duration = Duration::from_secs(2);
/// How often the writer sets its gauges at most.
const REFRESH_GAUGES: Duration = Duration::from_secs(5);
/// Longest consumer name and `txn_id`.
pub const MAX_NAME: usize = 64;
/// Messages per replay page.
pub const PAGE: usize = 256;

/// `[inbox]`: how long and how much the inbox keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InboxSettings {
    /// Messages older than this are trimmed (ms). Default 7 days.
    pub retention_ms: u64,
    /// The newest this many messages of each account are kept. Default 100,000.
    pub max_messages_per_account: u64,
    /// Durable consumers at most. Default 64.
    pub max_consumers: u64,
}

impl Default for InboxSettings {
    fn default() -> Self {
        Self {
            retention_ms: 7 * 24 * 3600 * 1000,
            max_messages_per_account: 100_000,
            max_consumers: 64,
        }
    }
}

/// A message to store, as the account read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// The account's alias.
    pub account: String,
    /// The room it was sent in.
    pub room_id: String,
    /// Its event ID.
    pub event_id: String,
    /// Its sender's full ID.
    pub sender: String,
    /// Its text.
    pub body: String,
    /// The thread it belongs to, if any.
    pub thread_root: Option<String>,
    /// The homeserver's timestamp (ms since the epoch).
    pub origin_ts_ms: u64,
    /// Sent in a direct chat.
    pub is_direct: bool,
    /// It mentions the account.
    pub mentioned: bool,
}

impl NewMessage {
    /// As operators see it, with its cursor once stored.
    pub fn into_chat(self, cursor: Option<u64>) -> ChatMessage {
        ChatMessage {
            cursor,
            account: self.account,
            room_id: self.room_id,
            sender: self.sender,
            event_id: self.event_id,
            body: self.body,
            thread_root: self.thread_root,
            is_direct: self.is_direct,
            mentioned: self.mentioned,
        }
    }
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its cursor.
    pub cursor: u64,
    /// The message.
    pub message: NewMessage,
    /// When it was stored (ms since the epoch).
    pub stored_ms: u64,
}

impl Stored {
    /// As operators see it.
    pub fn to_chat(&self) -> ChatMessage {
        self.message.clone().into_chat(Some(self.cursor))
    }
}

/// Messages of `account` with cursors in `from..=to` were trimmed before this reader got
/// them: the payload of `chat.gap`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gap {
    /// The account.
    pub account: String,
    /// The first cursor that may be missing (the reader's position + 1).
    pub from: u64,
    /// The highest cursor trimmed.
    pub to: u64,
}

/// Where a reader starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// The oldest message kept (no gap is reported for what was trimmed before).
    Earliest,
    /// After this cursor.
    After(u64),
}

/// One page of a replay.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// What was trimmed above the position, per account.
    pub gaps: Vec<Gap>,
    /// Up to [`PAGE`] messages after the position, oldest first.
    pub messages: Vec<Stored>,
}

/// What `inbox.stats` answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// The newest cursor given.
    pub head: u64,
    /// Per account.
    pub accounts: BTreeMap<String, AccountStats>,
    /// Per durable consumer.
    pub consumers: BTreeMap<String, ConsumerStats>,
}

/// One account in [`Stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AccountStats {
    /// Messages stored.
    pub messages: u64,
    /// Messages above both the highest cursor of this account sent to an operator (live or
    /// replayed) since the inbox opened and the highest cursor any consumer acknowledged.
    pub undelivered: u64,
    /// Age of the oldest of those, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_undelivered_age_ms: Option<u64>,
    /// The highest cursor of this account trimmed away, 0 if none.
    pub trimmed_through: u64,
}

/// One consumer in [`Stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConsumerStats {
    /// The cursor it acknowledged.
    pub cursor: u64,
    /// Cursors given after it: how many messages it has yet to acknowledge (trimmed ones
    /// included).
    pub lag: u64,
}

/// Why an inbox request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InboxError {
    /// The request is wrong (a cursor past the newest, a bad name).
    #[error("{0}")]
    BadRequest(String),
    /// A bound was reached.
    #[error("{0}")]
    TooMany(String),
    /// Too many requests are waiting for the writer.
    #[error("the inbox has too many requests waiting; try again")]
    Busy,
    /// The file could not be read or written.
    #[error("the inbox at {path} failed: {error}")]
    Store {
        /// The file.
        path: String,
        /// SQLite's error.
        error: String,
    },
    /// The writer is gone (the process is ending).
    #[error("the inbox is closed")]
    Closed,
}

/// The handle to the inbox: cheap to clone.
#[derive(Clone)]
pub struct Inbox(Arc<Shared>);

struct Shared {
    path: PathBuf,
    requests: SyncSender<Op>,
    /// Requests other than an account's commit waiting for the writer: at most half the
    /// queue, so that operators can never crowd out the accounts' commits.
    queued: AtomicUsize,
    /// The highest cursor of each account sent to an operator (live or replayed).
    delivered: Mutex<HashMap<String, u64>>,
    settings: InboxSettings,
}

impl fmt::Debug for Inbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbox").field("path", &self.0.path).finish()
    }
}

type Reply<T> = oneshot::Sender<Result<T, InboxError>>;

enum Op {
    Position(String, Reply<Option<String>>),
    Forget(String, Reply<()>),
    Commit {
        account: String,
        messages: Vec<NewMessage>,
        token: Option<String>,
        reply: Reply<Vec<u64>>,
    },
    Page {
        after: u64,
        limit: usize,
        reply: Reply<Page>,
    },
    Start {
        consumer: Option<String>,
        since: Option<Since>,
        reply: Reply<(u64, Vec<Gap>)>,
    },
    Ack {
        consumer: String,
        cursor: u64,
        reply: Reply<u64>,
    },
    Sent {
        account: String,
        txn_id: String,
        reply: Reply<Option<String>>,
    },
    RecordSend {
        account: String,
        txn_id: String,
        room_id: String,
        event_id: String,
        reply: Reply<String>,
    },
    Stats(Reply<Stats>),
}

/// Whether `op` comes from an account's sync loop (not limited to half the queue).
fn from_account(op: &Op) -> bool {
    matches!(op, Op::Commit { .. } | Op::Position(..) | Op::Forget(..))
}

/// Creates `path` with mode 0600 unless it exists.
fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Checks a consumer name or `txn_id`: 1..=[`MAX_NAME`] bytes of the allowed characters.
pub fn check_name(what: &str, name: &str, extra: &[char]) -> Result<(), InboxError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || extra.contains(&c)
        });
    if ok {
        Ok(())
    } else {
        let shown: String = name.chars().take(32).collect();
        Err(InboxError::BadRequest(format!(
            "{what} must be 1 to {MAX_NAME} characters of A-Z a-z 0-9 . _ -{}; {shown:?} is not",
            extra.iter().map(|c| format!(" {c}")).collect::<String>()
        )))
    }
}

impl Inbox {
    /// Opens (creating) the inbox at `path` and starts its writer, which publishes stored
    /// messages on `hub`.
    pub fn open(path: &Path, settings: InboxSettings, hub: Hub) -> Result<Self, InboxError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| InboxError::Store {
                path: path.display().to_string(),
                error: format!("cannot create {}: {e}", dir.display()),
            })?;
        }
        create_private(path).map_err(|e| InboxError::Store {
            path: path.display().to_string(),
            error: format!("cannot create it: {e}"),
        })?;
        let store = Store::open(path).map_err(|e| InboxError::Store {
            path: path.display().to_string(),
            error: e.to_string(),
        })?;
        let (requests, queue) = mpsc::sync_channel(QUEUE);
        let consumers = store.consumers().unwrap_or_default();
        let floor = consumers.values().copied().max().unwrap_or(0);
        let delivered = store
            .counts()
            .keys()
            .map(|account| (account.clone(), floor))
            .collect();
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            requests,
            queued: AtomicUsize::new(0),
            delivered: Mutex::new(delivered),
            settings: settings.clone(),
        });
        let writer = Writer {
            store,
            path: path.display().to_string(),
            settings,
            hub,
            shared: Arc::downgrade(&shared),
            last_refresh: Instant::now() - REFRESH_GAUGES,
            last_age_trim: Instant::now() - REFRESH,
        };
        std::thread::Builder::new()
            .name("inbox-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| InboxError::Store {
                path: path.display().to_string(),
                error: format!("cannot start the writer thread: {e}"),
            })?;
        info!(path = %path.display(), "Inbox open.");
        Ok(Self(shared))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.0.path
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &InboxSettings {
        &self.0.settings
    }

    async fn ask<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, InboxError> {
        let (reply, answer) = oneshot::channel();
        let op = op(reply);
        let counted = !from_account(&op);
        if counted && self.0.queued.fetch_add(1, Ordering::AcqRel) >= QUEUE / 2 {
            self.0.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(InboxError::Busy);
        }
        match self.0.requests.try_send(op) {
            Ok(()) => {}
            Err(e) => {
                if counted {
                    self.0.queued.fetch_sub(1, Ordering::AcqRel);
                }
                return Err(match e {
                    TrySendError::Full(_) => InboxError::Busy,
                    TrySendError::Disconnected(_) => InboxError::Closed,
                });
            }
        }
        answer.await.map_err(|_| InboxError::Closed)?
    }

    /// The sync position stored for `account`: where its next sync starts.
    pub async fn position(&self, account: &str) -> Result<Option<String>, InboxError> {
        self.ask(|reply| Op::Position(account.to_string(), reply))
            .await
    }

    /// Stores `messages` of `account` (those not stored yet) and moves its sync position
    /// to `token` (when given), in one transaction; then publishes the new ones as
    /// `chat.message`. Returns their cursors.
    pub async fn commit(
        &self,
        account: &str,
        messages: Vec<NewMessage>,
        token: Option<String>,
    ) -> Result<Vec<u64>, InboxError> {
        self.ask(|reply| Op::Commit {
            account: account.to_string(),
            messages,
            token,
            reply,
        })
        .await
    }

    /// Drops `account`'s sync position (one the homeserver refuses): its next sync starts
    /// from the Matrix store's.
    pub async fn forget_position(&self, account: &str) -> Result<(), InboxError> {
        self.ask(|reply| Op::Forget(account.to_string(), reply))
            .await
    }

    /// Where a reader starts: `consumer`'s position (created at `since`, else at the
    /// oldest message kept, when new), or `since`; with the gaps it must not be told about
    /// (those trimmed before an `Earliest` start).
    pub async fn start(
        &self,
        consumer: Option<String>,
        since: Option<Since>,
    ) -> Result<(u64, Vec<Gap>), InboxError> {
        self.ask(|reply| Op::Start {
            consumer,
            since,
            reply,
        })
        .await
    }

    /// Up to `limit` messages after `after`, and what was trimmed above it.
    pub async fn page(&self, after: u64, limit: usize) -> Result<Page, InboxError> {
        self.ask(|reply| Op::Page {
            after,
            limit,
            reply,
        })
        .await
    }

    /// Moves consumer `name` to `cursor` (never back); its cursor after.
    pub async fn ack(&self, name: &str, cursor: u64) -> Result<u64, InboxError> {
        self.ask(|reply| Op::Ack {
            consumer: name.to_string(),
            cursor,
            reply,
        })
        .await
    }

    /// The event ID an earlier `chat.send` with `txn_id` on `account` got.
    pub async fn sent(&self, account: &str, txn_id: &str) -> Result<Option<String>, InboxError> {
        self.ask(|reply| Op::Sent {
            account: account.to_string(),
            txn_id: txn_id.to_string(),
            reply,
        })
        .await
    }

    /// Records that `chat.send` `txn_id` on `account` became `event_id`; the event ID
    /// recorded first.
    pub async fn record_send(
        &self,
        account: &str,
        txn_id: &str,
        room_id: &str,
        event_id: &str,
    ) -> Result<String, InboxError> {
        self.ask(|reply| Op::RecordSend {
            account: account.to_string(),
            txn_id: txn_id.to_string(),
            room_id: room_id.to_string(),
            event_id: event_id.to_string(),
            reply,
        })
        .await
    }

    /// What `inbox.stats` answers.
    pub async fn stats(&self) -> Result<Stats, InboxError> {
        self.ask(Op::Stats).await
    }

    /// Notes that `account`'s message `cursor` was sent to an operator.
    pub fn delivered(&self, account: &str, cursor: u64) {
        let mut delivered = self.0.delivered.lock().unwrap_or_else(|e| e.into_inner());
        match delivered.get_mut(account) {
            Some(mark) => *mark = (*mark).max(cursor),
            None => {
                delivered.insert(account.to_string(), cursor);
            }
        }
    }
}

/// The thread that owns the file.
struct Writer {
    store: Store,
    path: String,
    settings: InboxSettings,
    hub: Hub,
    shared: std::sync::Weak<Shared>,
    last_refresh: Instant,
    last_age_trim: Instant,
}

/// A write's answer, sent once the transaction committed (or with its error).
enum Done {
    Cursors(Reply<Vec<u64>>, Result<Vec<u64>, InboxError>),
    Start(Reply<(u64, Vec<Gap>)>, Result<(u64, Vec<Gap>), InboxError>),
    Cursor(Reply<u64>, Result<u64, InboxError>),
    Event(Reply<String>, Result<String, InboxError>),
    Unit(Reply<()>, Result<(), InboxError>),
}

impl Done {
    fn send(self, failed: Option<&InboxError>) {
        macro_rules! answer {
            ($reply:expr, $result:expr) => {{
                let _ = $reply.send(match failed {
                    Some(e) => Err(e.clone()),
                    None => $result,
                });
            }};
        }
        match self {
            Done::Cursors(reply, result) => answer!(reply, result),
            Done::Start(reply, result) => answer!(reply, result),
            Done::Cursor(reply, result) => answer!(reply, result),
            Done::Event(reply, result) => answer!(reply, result),
            Done::Unit(reply, result) => answer!(reply, result),
        }
    }
}

impl Writer {
    fn run(mut self, queue: mpsc::Receiver<Op>) {
        loop {
            let first = match queue.recv_timeout(REFRESH) {
                Ok(op) => Some(op),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut ops: Vec<Op> = first.into_iter().collect();
            while ops.len() < BATCH {
                match queue.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            let counted = ops.iter().filter(|op| !from_account(op)).count();
            if let Some(shared) = self.shared.upgrade() {
                shared.queued.fetch_sub(counted, Ordering::AcqRel);
            }
            // A panic fails this batch's callers (their replies are dropped: `Closed`), not
            // the inbox: the transaction rolled back, and the file is opened afresh.
            let batch = std::panic::catch_unwind(AssertUnwindSafe(|| self.batch(ops)));
            if batch.is_err() {
                error!(path = %self.path, "An inbox batch panicked; its requests failed, nothing of it was stored. Reopening the file.");
                metrics::counter!(metric::FAILURES_TOTAL).increment(1);
                match Store::open(Path::new(&self.path)) {
                    Ok(store) => self.store = store,
                    Err(e) => error!(path = %self.path, error = %e, "Cannot reopen the inbox."),
                }
            }
            if self.last_refresh.elapsed() >= REFRESH_GAUGES {
                self.refresh();
            }
        }
    }

    fn store_error(&self, e: rusqlite::Error) -> InboxError {
        InboxError::Store {
            path: self.path.clone(),
            error: e.to_string(),
        }
    }

    /// The writes of `ops` in one transaction, then their answers, then the reads.
    fn batch(&mut self, ops: Vec<Op>) {
        let (writes, reads): (Vec<Op>, Vec<Op>) = ops.into_iter().partition(|op| {
            matches!(
                op,
                Op::Commit { .. }
                    | Op::Start { .. }
                    | Op::Ack { .. }
                    | Op::RecordSend { .. }
                    | Op::Forget(..)
            )
        });
        let age_trim = self.last_age_trim.elapsed() >= REFRESH;
        if !writes.is_empty() || age_trim {
            self.writes(writes, age_trim);
        }
        for op in reads {
            self.read(op);
        }
    }

    fn writes(&mut self, writes: Vec<Op>, age_trim: bool) {
        let started = Instant::now();
        let now = now_ms();
        let max_consumers = self.settings.max_consumers;
        let mut done = Vec::with_capacity(writes.len());
        let mut published: Vec<(u64, NewMessage)> = Vec::new();
        let mut appended: BTreeMap<String, u64> = BTreeMap::new();
        let outcome = (|| -> Result<BTreeMap<String, u64>, rusqlite::Error> {
            let mut batch = self.store.transaction()?;
            let mut count_trim = false;
            for op in writes {
                match op {
                    Op::Commit {
                        account,
                        messages,
                        token,
                        reply,
                    } => {
                        let mut cursors = Vec::new();
                        for message in messages {
                            if let Some(cursor) = batch.append(&message, now)? {
                                cursors.push(cursor);
                                published.push((cursor, message));
                            }
                        }
                        *appended.entry(account.clone()).or_default() += cursors.len() as u64;
                        count_trim |= !cursors.is_empty();
                        if let Some(token) = &token {
                            batch.set_position(&account, token)?;
                        }
                        done.push(Done::Cursors(reply, Ok(cursors)));
                    }
                    Op::Start {
                        consumer,
                        since,
                        reply,
                    } => {
                        let result = start(&mut batch, consumer, since, max_consumers, now)?;
                        done.push(Done::Start(reply, result));
                    }
                    Op::Ack {
                        consumer,
                        cursor,
                        reply,
                    } => {
                        let head = batch.head()?;
                        let result = if cursor > head {
                            Err(InboxError::BadRequest(format!(
                                "cursor {cursor} is past the newest message ({head})"
                            )))
                        } else if !batch.consumer_exists(&consumer)?
                            && batch.consumer_count()? >= max_consumers
                        {
                            Err(too_many_consumers(max_consumers))
                        } else {
                            Ok(batch.ack(&consumer, cursor, now)?)
                        };
                        done.push(Done::Cursor(reply, result));
                    }
                    Op::Forget(account, reply) => {
                        batch.forget_position(&account)?;
                        done.push(Done::Unit(reply, Ok(())));
                    }
                    Op::RecordSend {
                        account,
                        txn_id,
                        room_id,
                        event_id,
                        reply,
                    } => {
                        let recorded =
                            batch.record_send(&account, &txn_id, &room_id, &event_id, now)?;
                        done.push(Done::Event(reply, Ok(recorded)));
                    }
                    _ => {}
                }
            }
            let trimmed = if count_trim || age_trim {
                let older_than = age_trim.then(|| now.saturating_sub(self.settings.retention_ms));
                batch.trim(self.settings.max_messages_per_account, older_than)?
            } else {
                BTreeMap::new()
            };
            batch.commit()?;
            Ok(trimmed)
        })();
        if age_trim {
            self.last_age_trim = Instant::now();
        }
        match outcome {
            Ok(trimmed) => {
                for answer in done {
                    answer.send(None);
                }
                metrics::histogram!(metric::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
                for (account, n) in appended.into_iter().filter(|(_, n)| *n > 0) {
                    metrics::counter!(metric::APPENDED_TOTAL, "account" => account).increment(n);
                }
                for (account, n) in trimmed {
                    metrics::counter!(metric::TRIMMED_TOTAL, "account" => account).increment(n);
                }
                for (cursor, message) in published {
                    let account = message.account.clone();
                    let chat = message.into_chat(Some(cursor));
                    self.hub
                        .publish_stored(MESSAGE_EVENT, json!(chat), cursor, &account);
                }
            }
            Err(e) => {
                let e = self.store_error(e);
                error!(error = %e, "An inbox transaction failed; nothing of it was stored.");
                metrics::counter!(metric::FAILURES_TOTAL).increment(1);
                for answer in done {
                    answer.send(Some(&e));
                }
            }
        }
    }

    fn read(&mut self, op: Op) {
        match op {
            Op::Position(account, reply) => {
                let _ = reply.send(
                    self.store
                        .position(&account)
                        .map_err(|e| self.store_error(e)),
                );
            }
            Op::Page {
                after,
                limit,
                reply,
            } => {
                let page = (|| {
                    Ok(Page {
                        gaps: self.store.gaps(after)?,
                        messages: self.store.page(after, limit)?,
                    })
                })();
                let _ = reply.send(page.map_err(|e: rusqlite::Error| self.store_error(e)));
            }
            Op::Sent {
                account,
                txn_id,
                reply,
            } => {
                let sent = self.store.sent(&account, &txn_id);
                let _ = reply.send(sent.map_err(|e| self.store_error(e)));
            }
            Op::Stats(reply) => {
                let stats = self.stats();
                let _ = reply.send(stats.map_err(|e| self.store_error(e)));
            }
            _ => {}
        }
    }

    fn stats(&self) -> Result<Stats, rusqlite::Error> {
        let now = now_ms();
        let delivered = match self.shared.upgrade() {
            Some(shared) => shared
                .delivered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            None => HashMap::new(),
        };
        let consumers = self.store.consumers()?;
        let acked = consumers.values().copied().max().unwrap_or(0);
        let trimmed = self.store.trimmed()?;
        let mut accounts = BTreeMap::new();
        let names = self.store.counts().keys().chain(trimmed.keys());
        for account in names {
            if accounts.contains_key(account) {
                continue;
            }
            let mark = delivered.get(account).copied().unwrap_or(0).max(acked);
            let (undelivered, oldest) = self.store.above(account, mark)?;
            accounts.insert(
                account.clone(),
                AccountStats {
                    messages: self.store.counts().get(account).copied().unwrap_or(0),
                    undelivered,
                    oldest_undelivered_age_ms: oldest.map(|t| now.saturating_sub(t)),
                    trimmed_through: trimmed.get(account).copied().unwrap_or(0),
                },
            );
        }
        let head = self.store.head()?;
        let by_consumer = consumers
            .into_iter()
            .map(|(name, cursor)| {
                let lag = head.saturating_sub(cursor);
                (name, ConsumerStats { cursor, lag })
            })
            .collect();
        Ok(Stats {
            head,
            accounts,
            consumers: by_consumer,
        })
    }

    /// Sets the gauges from [`Writer::stats`].
    fn refresh(&mut self) {
        self.last_refresh = Instant::now();
        let Ok(stats) = self.stats() else {
            return;
        };
        for (account, s) in stats.accounts {
            metrics::gauge!(metric::MESSAGES, "account" => account.clone()).set(s.messages as f64);
            metrics::gauge!(metric::UNDELIVERED, "account" => account.clone())
                .set(s.undelivered as f64);
            let age = s.oldest_undelivered_age_ms.unwrap_or(0) as f64 / 1000.0;
            metrics::gauge!(metric::OLDEST_UNDELIVERED_AGE_SECONDS, "account" => account).set(age);
        }
        for (consumer, s) in stats.consumers {
            metrics::gauge!(metric::CONSUMER_LAG, "consumer" => consumer).set(s.lag as f64);
        }
    }
}

impl Stats {
    /// Adds each account's figures, as `inbox`, to its node (`root/channels/matrix/<alias>`)
    /// in `tree`, a serialized tree snapshot.
    pub fn annotate(&self, tree: &mut serde_json::Value) {
        fn walk(node: &mut serde_json::Value, stats: &Stats) {
            if let Some(alias) = node["path"]
                .as_str()
                .and_then(|p| p.strip_prefix("root/channels/matrix/"))
                .filter(|alias| !alias.contains('/'))
                .map(str::to_string)
            {
                let figures = stats.accounts.get(&alias).cloned().unwrap_or_default();
                node["inbox"] = json!(figures);
            }
            if let Some(children) = node
                .get_mut("children")
                .and_then(serde_json::Value::as_array_mut)
            {
                for child in children {
                    walk(child, stats);
                }
            }
        }
        walk(tree, self);
    }

    /// The figures as lines to put under a drawn tree.
    pub fn render_text(&self) -> String {
        let mut text = format!("inbox: newest cursor {}\n", self.head);
        for (account, a) in &self.accounts {
            let oldest = a.oldest_undelivered_age_ms.map_or(String::new(), |ms| {
                format!(", oldest undelivered {} s ago", ms / 1000)
            });
            text.push_str(&format!(
                "  account {account}: {} stored, {} undelivered{oldest}\n",
                a.messages, a.undelivered
            ));
        }
        for (consumer, c) in &self.consumers {
            text.push_str(&format!(
                "  consumer {consumer}: at {}, {} behind\n",
                c.cursor, c.lag
            ));
        }
        text
    }
}

fn too_many_consumers(max: u64) -> InboxError {
    InboxError::TooMany(format!(
        "{max} durable consumers exist (inbox.max_consumers); reuse a name"
    ))
}

/// [`Inbox::start`] inside a write transaction.
fn start(
    batch: &mut store::Batch<'_>,
    consumer: Option<String>,
    since: Option<Since>,
    max_consumers: u64,
    now: u64,
) -> Result<Result<(u64, Vec<Gap>), InboxError>, rusqlite::Error> {
    let head = batch.head()?;
    if let Some(Since::After(cursor)) = since
        && cursor > head
    {
        return Ok(Err(InboxError::BadRequest(format!(
            "since {cursor} is past the newest message ({head})"
        ))));
    }
    // A new consumer starts at `since`, else at the oldest message kept; an existing one
    // resumes after its last ack (`since` does not move it: only acks do, forward).
    let mut fresh = false;
    let position = match (&consumer, since) {
        (Some(name), since) => {
            if batch.consumer_exists(name)? {
                batch.touch_consumer(name, now)?;
            } else {
                if batch.consumer_count()? >= max_consumers {
                    return Ok(Err(too_many_consumers(max_consumers)));
                }
                // Only an explicit "earliest" asks for what is kept: a new name may be an
                // old consumer that was forgotten, and must hear what it missed.
                fresh = since == Some(Since::Earliest);
            }
            let start = match since {
                Some(Since::After(cursor)) => cursor,
                _ => 0,
            };
            batch.consumer_or(name, start, now)?
        }
        (None, Some(Since::After(cursor))) => cursor,
        (None, _) => {
            fresh = true;
            0
        }
    };
    // Reading from the oldest message kept is not a gap: nothing was asked for before it.
    let skip = if fresh {
        batch.gaps_above(position)?
    } else {
        Vec::new()
    };
    Ok(Ok((position, skip)))
}

/// The inbox's metrics.
pub mod metric {
    crate::supervision::metrics::declare! {
        /// Gauge: messages stored, by `account`.
        gauge MESSAGES = "warden_inbox_messages", "Messages stored in the inbox.";
        /// Gauge: messages no operator was sent and no consumer acknowledged, by `account`.
        gauge UNDELIVERED = "warden_inbox_undelivered",
            "Inbox messages not yet sent to any operator.";
        /// Gauge: age of the oldest undelivered message, by `account`.
        gauge OLDEST_UNDELIVERED_AGE_SECONDS = "warden_inbox_oldest_undelivered_age_seconds",
            "Age of the oldest inbox message not yet sent to any operator.";
        /// Gauge: cursors given after a durable consumer's acknowledged one, by `consumer`.
        gauge CONSUMER_LAG = "warden_inbox_consumer_lag",
            "Inbox cursors given after a durable consumer's acknowledged one.";
        /// Counter: messages appended, by `account`.
        counter APPENDED_TOTAL = "warden_inbox_appended_total", "Messages appended to the inbox.";
        /// Counter: messages trimmed by retention, by `account`.
        counter TRIMMED_TOTAL = "warden_inbox_trimmed_total",
            "Inbox messages trimmed by retention.";
        /// Counter: transactions that failed (nothing of them stored).
        counter FAILURES_TOTAL = "warden_inbox_failures_total", "Inbox transactions that failed.";
        /// Histogram: time of one batched transaction, in seconds.
        histogram COMMIT_SECONDS = "warden_inbox_commit_seconds",
            "Time of one batched inbox transaction, fsync included.";
    }
}

#[cfg(test)]
mod tests;
