//! The start-slot actor: named FIFO pools that admit starts a few at a time.
//!
//! Many children starting at once against one server (eleven approval handlers
//! handshaking with their own gateway on the same tick) is how a restart becomes a storm.
//! A child asks its pool for a slot before the expensive part of its start and gives it
//! back when that part is over; at most `max_concurrent` hold one at a time, the rest wait
//! in arrival order.
//!
//! ## Messages
//! `Acquire` (from [`SlotClient::acquire`]), `Enqueue` (a first start's jitter is over),
//! `Release` (a [`SlotGuard`] was dropped), `HoldCheck` (the pool's earliest hold deadline
//! passed: force-release every holder past its hold timeout).
//!
//! ## Supervision
//! A permanent child of the root. Its clients hold a [`SlotClient`], which follows the actor
//! across restarts. A restart loses the queue: waiting callers get [`SlotError::Unavailable`]
//! and, being in a start, fail transiently and come back through their own backoff. It has
//! no child actors; its timers (first-start jitter, hold deadlines) are `send_after`
//! messages to itself, aborted in `post_stop`.
//!
//! ## Restart policy
//! Kind `start_slots`, with the policy its spec is given (`Policy::default()` unless the
//! program configures one: 1 s → 60 s, ×2, jitter 20 %, unlimited, park). No handler
//! fails: only a panic or a kill ends it, and that is transient.
//!
//! ## Semantics
//! * Jitter (uniform in `[0, jitter)`) delays only a child's *first* start; restarts already
//!   have backoff jitter.
//! * A caller that stops waiting (its future dropped, its actor killed) is skipped when its
//!   turn comes and does not use a turn.
//! * Dropping the guard releases the slot — also when its holder panics or is killed, since
//!   its state is dropped. Release is idempotent.
//! * A slot held past `hold_timeout` is force-released with a warning naming the holder.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ractor::concurrency::JoinHandle;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tracing::warn;

use super::backoff::Jitter;
use super::child::{ChildContext, ChildSpec};
use super::metrics as m;
use super::policy::{Policy, Restart};
use super::view::{Inner, PoolView};

/// The kind of the start-slot child, for policies and metrics.
pub const KIND: &str = "start_slots";

/// The start-slot actor's built-in policy: [`Policy::DEFAULT`].
pub const DEFAULT_POLICY: Policy = Policy::DEFAULT;

/// A pending timer message.
type Timer = JoinHandle<Result<(), ractor::MessagingErr<SlotMsg>>>;

/// How many queued waiters the snapshot lists by name.
const QUEUE_HEAD: usize = 16;

/// One pool's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// How many may hold a slot at once (at least 1).
    pub max_concurrent: usize,
    /// Random delay before a first start joins the queue: uniform in `[0, jitter)`.
    pub jitter: Duration,
    /// A slot held longer than this is force-released.
    pub hold_timeout: Duration,
}

/// Why no slot was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// No pool of that name is configured.
    #[error("no start-slot pool named {0:?}")]
    UnknownPool(String),
    /// The start-slot actor is not running (restarting, or the tree is stopping).
    #[error("the start-slot actor is not running")]
    Unavailable,
}

/// Messages of [`StartSlots`].
pub enum SlotMsg {
    /// Ask for a slot.
    Acquire {
        /// The pool.
        pool: String,
        /// Who asks (a path), for the snapshot and the hold-timeout warning.
        holder: String,
        /// Whether the pool's jitter applies (first starts only).
        first_start: bool,
        /// When the caller asked, for the wait histogram.
        asked_at: Instant,
        /// The slot, or why not.
        reply: oneshot::Sender<Result<SlotGuard, SlotError>>,
    },
    /// A jittered waiter joins its queue now.
    Enqueue {
        /// The waiter.
        waiter: u64,
    },
    /// A guard was dropped.
    Release {
        /// Its lease.
        lease: u64,
    },
    /// The earliest hold deadline of a pool passed. One timer per pool, armed for its
    /// earliest holder, rather than one per lease.
    HoldCheck {
        /// The pool's index.
        pool: usize,
    },
    /// New settings for the pools (a config reload): a pool keeps its holders and queue,
    /// and a larger `max_concurrent` admits the next waiters at once; a smaller one admits
    /// no one until enough holders left. A new name is a new pool; a pool left out stays.
    Configure {
        /// Pools by name.
        pools: Vec<(String, PoolSettings)>,
    },
}

/// A held start slot; dropping it gives the slot back.
pub struct SlotGuard {
    lease: u64,
    actor: ActorRef<SlotMsg>,
    armed: bool,
}

impl SlotGuard {
    /// Gives the slot back now (the same as dropping the guard).
    pub fn release(self) {}

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if self.armed {
            // If the actor is gone, so is the slot.
            let _ = self
                .actor
                .send_message(SlotMsg::Release { lease: self.lease });
        }
    }
}

impl fmt::Debug for SlotGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotGuard")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// How children reach the start-slot actor; follows it across restarts. It also holds the
/// pools the actor starts with, which [`SlotClient::configure`] changes.
#[derive(Clone, Default)]
pub struct SlotClient {
    actor: Arc<RwLock<Option<ActorRef<SlotMsg>>>>,
    pools: Arc<RwLock<Vec<(String, PoolSettings)>>>,
}

impl fmt::Debug for SlotClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SlotClient")
    }
}

impl SlotClient {
    /// A client not yet connected to an actor.
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits for a slot of `pool` in FIFO order. Cancel by dropping the future.
    pub async fn acquire(
        &self,
        pool: &str,
        holder: &str,
        first_start: bool,
    ) -> Result<SlotGuard, SlotError> {
        let actor = self.current().ok_or(SlotError::Unavailable)?;
        let (reply, answer) = oneshot::channel();
        let msg = SlotMsg::Acquire {
            pool: pool.to_string(),
            holder: holder.to_string(),
            first_start,
            asked_at: Instant::now(),
            reply,
        };
        actor
            .send_message(msg)
            .map_err(|_| SlotError::Unavailable)?;
        answer.await.map_err(|_| SlotError::Unavailable)?
    }

    fn current(&self) -> Option<ActorRef<SlotMsg>> {
        self.actor.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes the pools in place: the running actor applies `pools` at once (see
    /// [`SlotMsg::Configure`]) and every later incarnation starts with them.
    pub fn configure(&self, pools: Vec<(String, PoolSettings)>) {
        {
            let mut current = self.pools.write().unwrap_or_else(|e| e.into_inner());
            for (name, settings) in &pools {
                match current.iter_mut().find(|(n, _)| n == name) {
                    Some(slot) => slot.1 = *settings,
                    None => current.push((name.clone(), *settings)),
                }
            }
        }
        if let Some(actor) = self.current() {
            let _ = actor.send_message(SlotMsg::Configure { pools });
        }
    }

    fn set(&self, actor: Option<ActorRef<SlotMsg>>) {
        *self.actor.write().unwrap_or_else(|e| e.into_inner()) = actor;
    }

    /// The spec of a start-slot actor with `pools` (as [`SlotClient::configure`] changes
    /// them), reachable through this client.
    pub fn spec(&self, id: impl Into<String>, pools: Vec<(String, PoolSettings)>) -> ChildSpec {
        let client = self.clone();
        *self.pools.write().unwrap_or_else(|e| e.into_inner()) = pools;
        ChildSpec::new(id, KIND, Restart::Permanent, move |ctx: ChildContext| {
            let args = StartSlotsArgs {
                pools: client
                    .pools
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
                jitter: ctx.jitter.clone(),
                inner: ctx.inner.clone(),
                client: client.clone(),
            };
            async move {
                let (actor, _) =
                    Actor::spawn_linked(None, StartSlots, args, ctx.supervisor.clone()).await?;
                Ok(actor.get_cell())
            }
        })
    }

    /// Starts a start-slot actor outside any tree (tests, benchmarks).
    pub async fn spawn_standalone(
        pools: Vec<(String, PoolSettings)>,
        jitter: Jitter,
    ) -> Result<(SlotClient, ActorRef<SlotMsg>), ractor::SpawnErr> {
        let client = SlotClient::new();
        let args = StartSlotsArgs {
            pools,
            jitter,
            inner: Arc::new(watch::channel(Inner::Leaf).0),
            client: client.clone(),
        };
        let (actor, _) = Actor::spawn(None, StartSlots, args).await?;
        Ok((client, actor))
    }
}

/// The start-slot actor.
pub struct StartSlots;

/// Starts the start-slot actor.
pub struct StartSlotsArgs {
    /// Pools by name.
    pub pools: Vec<(String, PoolSettings)>,
    /// Randomness of first-start jitter.
    pub jitter: Jitter,
    /// Where it publishes its pools.
    pub(crate) inner: Arc<watch::Sender<Inner>>,
    /// Pointed at this actor while it runs.
    pub client: SlotClient,
}

struct Waiter {
    holder: Arc<str>,
    asked_at: Instant,
    reply: oneshot::Sender<Result<SlotGuard, SlotError>>,
}

struct Holder {
    name: Arc<str>,
    since: Instant,
}

struct Pool {
    name: Arc<str>,
    settings: PoolSettings,
    holders: HashMap<u64, Holder>,
    queue: VecDeque<Waiter>,
    peak: usize,
    /// The hold-timeout timer, armed while anyone holds a slot.
    hold_timer: Option<Timer>,
    metrics: PoolMetrics,
}

/// A pool's metric handles, made once so the hot path allocates no labels.
struct PoolMetrics {
    holders: metrics::Gauge,
    peak: metrics::Gauge,
    queue: metrics::Gauge,
    wait: metrics::Histogram,
    cancelled: metrics::Counter,
    hold_timeouts: metrics::Counter,
}

impl PoolMetrics {
    fn new(pool: &str) -> Self {
        let label = || ("pool", pool.to_string());
        Self {
            holders: metrics::gauge!(m::SLOT_HOLDERS, &[label()]),
            peak: metrics::gauge!(m::SLOT_HOLDERS_PEAK, &[label()]),
            queue: metrics::gauge!(m::SLOT_QUEUE, &[label()]),
            wait: metrics::histogram!(m::SLOT_WAIT_SECONDS, &[label()]),
            cancelled: metrics::counter!(m::SLOT_CANCELLED_TOTAL, &[label()]),
            hold_timeouts: metrics::counter!(m::SLOT_HOLD_TIMEOUTS_TOTAL, &[label()]),
        }
    }
}

/// The start-slot actor's state.
pub struct StartSlotsState {
    pools: Vec<Pool>,
    /// Lease → pool index.
    leases: HashMap<u64, usize>,
    /// Waiters still in their first-start jitter: id → (pool index, waiter, timer).
    jittering: HashMap<u64, (usize, Waiter, Timer)>,
    next_id: u64,
    jitter: Jitter,
    inner: Arc<watch::Sender<Inner>>,
    client: SlotClient,
}

impl Actor for StartSlots {
    type Msg = SlotMsg;
    type State = StartSlotsState;
    type Arguments = StartSlotsArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: StartSlotsArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let pools = args
            .pools
            .into_iter()
            .map(|(name, settings)| Pool::new(name, settings))
            .collect();
        args.client.set(Some(myself));
        let state = StartSlotsState {
            pools,
            leases: HashMap::new(),
            jittering: HashMap::new(),
            next_id: 0,
            jitter: args.jitter,
            inner: args.inner,
            client: args.client,
        };
        for i in 0..state.pools.len() {
            state.gauges(i);
        }
        state.publish();
        Ok(state)
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if state
            .client
            .current()
            .is_some_and(|a| a.get_id() == myself.get_id())
        {
            state.client.set(None);
        }
        for pool in &mut state.pools {
            pool.holders.clear();
            if let Some(timer) = pool.hold_timer.take() {
                timer.abort();
            }
        }
        for (_, (_, _, timer)) in state.jittering.drain() {
            timer.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SlotMsg::Acquire {
                pool,
                holder,
                first_start,
                asked_at,
                reply,
            } => {
                let Some(idx) = state.pools.iter().position(|p| *p.name == *pool) else {
                    let _ = reply.send(Err(SlotError::UnknownPool(pool)));
                    return Ok(());
                };
                let waiter = Waiter {
                    holder: holder.into(),
                    asked_at,
                    reply,
                };
                let jitter = state.pools[idx].settings.jitter;
                if first_start && !jitter.is_zero() {
                    let delay = jitter.mul_f64(state.jitter.unit());
                    let id = state.next_id;
                    state.next_id += 1;
                    let timer = myself.send_after(delay, move || SlotMsg::Enqueue { waiter: id });
                    state.jittering.insert(id, (idx, waiter, timer));
                } else {
                    state.pools[idx].queue.push_back(waiter);
                    state.grant(&myself, idx);
                }
            }
            SlotMsg::Enqueue { waiter } => {
                if let Some((idx, waiter, _)) = state.jittering.remove(&waiter) {
                    state.pools[idx].queue.push_back(waiter);
                    state.grant(&myself, idx);
                }
            }
            SlotMsg::Release { lease } => {
                if let Some(idx) = state.leases.remove(&lease) {
                    state.pools[idx].holders.remove(&lease);
                    state.grant(&myself, idx);
                }
            }
            SlotMsg::HoldCheck { pool: idx } => {
                let now = Instant::now();
                let pool = &mut state.pools[idx];
                pool.hold_timer = None;
                let timeout = pool.settings.hold_timeout;
                let expired: Vec<u64> = pool
                    .holders
                    .iter()
                    .filter(|(_, h)| now.saturating_duration_since(h.since) >= timeout)
                    .map(|(lease, _)| *lease)
                    .collect();
                for lease in expired {
                    if let Some(holder) = pool.holders.remove(&lease) {
                        let held_ms =
                            now.saturating_duration_since(holder.since).as_millis() as u64;
                        warn!(pool = %pool.name, holder = %holder.name, held_ms,
                            "Start slot held past its hold timeout; force-released.");
                        pool.metrics.hold_timeouts.increment(1);
                    }
                    state.leases.remove(&lease);
                }
                state.grant(&myself, idx);
            }
            SlotMsg::Configure { pools } => {
                for (name, settings) in pools {
                    let settings = Pool::bounded(settings);
                    match state.pools.iter().position(|p| *p.name == *name) {
                        Some(idx) => {
                            state.pools[idx].settings = settings;
                            state.grant(&myself, idx);
                            state.gauges(idx);
                        }
                        None => {
                            state.pools.push(Pool::new(name, settings));
                            state.gauges(state.pools.len() - 1);
                        }
                    }
                }
                state.publish();
            }
        }
        Ok(())
    }
}

impl Pool {
    fn new(name: String, settings: PoolSettings) -> Self {
        Pool {
            metrics: PoolMetrics::new(&name),
            name: name.into(),
            settings: Pool::bounded(settings),
            holders: HashMap::new(),
            queue: VecDeque::new(),
            peak: 0,
            hold_timer: None,
        }
    }

    /// `settings` with at least one slot.
    fn bounded(settings: PoolSettings) -> PoolSettings {
        PoolSettings {
            max_concurrent: settings.max_concurrent.max(1),
            ..settings
        }
    }
}

impl StartSlotsState {
    /// Hands out free slots of pool `idx` to waiters in order, skipping those who left.
    fn grant(&mut self, myself: &ActorRef<SlotMsg>, idx: usize) {
        let pool = &mut self.pools[idx];
        while pool.holders.len() < pool.settings.max_concurrent {
            let Some(waiter) = pool.queue.pop_front() else {
                break;
            };
            if waiter.reply.is_closed() {
                pool.metrics.cancelled.increment(1);
                continue;
            }
            let lease = self.next_id;
            self.next_id += 1;
            let guard = SlotGuard {
                lease,
                actor: myself.clone(),
                armed: true,
            };
            if let Err(Ok(mut guard)) = waiter.reply.send(Ok(guard)) {
                // The caller left between the check and the send.
                guard.disarm();
                pool.metrics.cancelled.increment(1);
                continue;
            }
            let now = Instant::now();
            pool.metrics
                .wait
                .record(now.saturating_duration_since(waiter.asked_at).as_secs_f64());
            pool.holders.insert(
                lease,
                Holder {
                    name: waiter.holder,
                    since: now,
                },
            );
            pool.peak = pool.peak.max(pool.holders.len());
            self.leases.insert(lease, idx);
        }
        // Arm the pool's hold timer for its earliest holder.
        let pool = &mut self.pools[idx];
        if pool.hold_timer.is_none()
            && let Some(first) = pool.holders.values().map(|h| h.since).min()
        {
            let due =
                (first + pool.settings.hold_timeout).saturating_duration_since(Instant::now());
            pool.hold_timer =
                Some(myself.send_after(due, move || SlotMsg::HoldCheck { pool: idx }));
        }
        self.gauges(idx);
        self.publish();
    }

    fn gauges(&self, idx: usize) {
        let pool = &self.pools[idx];
        pool.metrics.holders.set(pool.holders.len() as f64);
        pool.metrics.peak.set(pool.peak as f64);
        pool.metrics.queue.set(pool.queue.len() as f64);
    }

    fn publish(&self) {
        let views = self
            .pools
            .iter()
            .map(|p| {
                let mut holders: Vec<(Arc<str>, Instant)> = p
                    .holders
                    .values()
                    .map(|h| (h.name.clone(), h.since))
                    .collect();
                holders.sort_by_key(|(_, since)| *since);
                PoolView {
                    name: p.name.clone(),
                    max_concurrent: p.settings.max_concurrent,
                    holders,
                    peak_holders: p.peak,
                    queue_len: p.queue.len(),
                    queue_head: p
                        .queue
                        .iter()
                        .take(QUEUE_HEAD)
                        .map(|w| w.holder.clone())
                        .collect(),
                }
            })
            .collect();
        self.inner.send_replace(Inner::Pools(views));
    }
}
