//! Benchmarks of the supervision kernel against its goals (see `BENCHMARKS.md`).
//!
//! * `restart` — latency from a child's failure to its replacement's `post_start`, through a
//!   warden tree with zero backoff, measured in the same run as a hand-written ractor
//!   supervisor that respawns the child with `spawn_linked`. Goal: warden p99 ≤ 2 × raw p99.
//! * `slots` — acquire+release pairs per second of one start-slot pool under 1,000
//!   concurrent tasks, beside a minimal ractor semaphore with the same protocol as a floor.
//!   Goal: ≥ 200,000 pairs/s, and never more holders than `max_concurrent`.
//! * `snapshot` — reading a 10,000-leaf tree (1 × 10,000 and 100 × 100), its JSON
//!   encoding, the latency of other actors while snapshots are taken, and the RSS.
//!   Goal: a read ≤ 10 ms.
//!
//! Run with `cargo bench -p warden-actors --bench kernel [-- restart|slots|snapshot|quick]`.
//! A plain `fn main` on a two-worker tokio runtime; no tracing subscriber is installed, so
//! the kernel's per-restart WARN costs only a disabled callsite. Under `cargo test` (which
//! does not pass `--bench`) it runs every section at toy sizes, as a smoke test.

#![expect(
    clippy::print_stdout,
    reason = "a benchmark reports its figures on stdout"
)]

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use common::{Report, Row, Size, Stats, ms};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::{Barrier, mpsc, oneshot};
use tokio::task::JoinSet;
use warden_actors::supervision::{
    Backoff, ChildSpec, ControlAction, Jitter, NodeSnapshot, NodeState, Policy, PoolSettings,
    Restart, SlotClient, Strategy, Tree, TreeHandle, TreeOptions,
};

// ---------------------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------------------

/// One tab-separated line per row, for a parent run to collect.
impl Report {
    fn print_rows(&self) {
        for r in &self.rows {
            println!(
                "ROW\t{}\t{}\t{}\t{}\t{}",
                r.bench, r.metric, r.value, r.goal, r.verdict
            );
        }
    }
}

fn us(v: f64) -> String {
    format!("{v:.1} µs")
}

/// The resident set size of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

impl Size {
    /// The word that selects this size on the command line.
    fn word(self) -> &'static str {
        self.pick("smoke", "quick", "full")
    }
}

// ---------------------------------------------------------------------------------------
// 1. Restart latency
// ---------------------------------------------------------------------------------------

/// What the restarted child shares with the bench: when it failed, and when (and as whom)
/// each incarnation finished `post_start`.
struct Signals {
    failed_at: Mutex<Option<Instant>>,
    started: mpsc::UnboundedSender<(Instant, ActorRef<ChildMsg>)>,
}

/// The child restarted in both measurements.
struct BenchChild;

enum ChildMsg {
    /// Record the time and fail (the handler returns `Err`).
    Fail,
}

impl Actor for BenchChild {
    type Msg = ChildMsg;
    type State = Arc<Signals>;
    type Arguments = Arc<Signals>;

    async fn pre_start(
        &self,
        _: ActorRef<ChildMsg>,
        args: Arc<Signals>,
    ) -> Result<Arc<Signals>, ActorProcessingErr> {
        Ok(args)
    }

    async fn post_start(
        &self,
        myself: ActorRef<ChildMsg>,
        state: &mut Arc<Signals>,
    ) -> Result<(), ActorProcessingErr> {
        let _ = state.started.send((Instant::now(), myself));
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<ChildMsg>,
        msg: ChildMsg,
        state: &mut Arc<Signals>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ChildMsg::Fail => {
                *state
                    .failed_at
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
                Err("bench failure".into())
            }
        }
    }
}

/// The baseline: the least a ractor supervisor can do to bring a failed child back.
struct RawSupervisor;

impl Actor for RawSupervisor {
    type Msg = ();
    type State = Arc<Signals>;
    type Arguments = Arc<Signals>;

    async fn pre_start(
        &self,
        _: ActorRef<()>,
        args: Arc<Signals>,
    ) -> Result<Arc<Signals>, ActorProcessingErr> {
        Ok(args)
    }

    async fn post_start(
        &self,
        myself: ActorRef<()>,
        state: &mut Arc<Signals>,
    ) -> Result<(), ActorProcessingErr> {
        Actor::spawn_linked(None, BenchChild, state.clone(), myself.get_cell()).await?;
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        event: SupervisionEvent,
        state: &mut Arc<Signals>,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(..) | SupervisionEvent::ActorTerminated(..) = event {
            Actor::spawn_linked(None, BenchChild, state.clone(), myself.get_cell()).await?;
        }
        Ok(())
    }
}

/// One restarted child and the means to fail it and time its restarts.
struct Subject {
    signals: Arc<Signals>,
    started: mpsc::UnboundedReceiver<(Instant, ActorRef<ChildMsg>)>,
    current: ActorRef<ChildMsg>,
}

impl Subject {
    async fn new(start: impl AsyncFnOnce(Arc<Signals>)) -> Subject {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let signals = Arc::new(Signals {
            failed_at: Mutex::new(None),
            started: tx,
        });
        start(signals.clone()).await;
        let (_, current) = rx.recv().await.expect("the first incarnation starts");
        Subject {
            signals,
            started: rx,
            current,
        }
    }

    /// Fails the current incarnation `n` times in a row, each time waiting for the next.
    async fn restarts(&mut self, n: usize, out: &mut Vec<Duration>) {
        for _ in 0..n {
            self.current
                .send_message(ChildMsg::Fail)
                .expect("the child is alive");
            let (started_at, next) = self.started.recv().await.expect("the child is restarted");
            let failed_at = self
                .signals
                .failed_at
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            let failed_at = failed_at.expect("the failure was recorded before the restart");
            out.push(started_at.saturating_duration_since(failed_at));
            self.current = next;
        }
    }
}

fn bench_child_spec(id: &str, signals: Arc<Signals>, policy: Policy) -> ChildSpec {
    ChildSpec::new(id, "bench", Restart::Permanent, move |ctx| {
        let args = signals.clone();
        async move {
            let (a, _) =
                Actor::spawn_linked(None, BenchChild, args, ctx.supervisor.clone()).await?;
            Ok(a.get_cell())
        }
    })
    .with_policy(policy)
}

struct RestartRun {
    warden: Vec<Duration>,
    raw: Vec<Duration>,
}

/// Measures both in alternating blocks, so drift of the shared machine hits both alike.
async fn restart_latency(policy: Policy, warmup: usize, total: usize, block: usize) -> RestartRun {
    let mut trees = Vec::new();
    let mut warden = Subject::new(async |signals| {
        let spec = bench_child_spec("bench", signals, policy);
        let tree = Tree::start(
            vec![spec],
            TreeOptions {
                jitter: Jitter::fixed(0.0),
                ..Default::default()
            },
        )
        .await
        .expect("the tree starts");
        trees.push(tree);
    })
    .await;
    let mut raw_sup = None;
    let mut raw = Subject::new(async |signals| {
        let (sup, _) = Actor::spawn(None, RawSupervisor, signals)
            .await
            .expect("the raw supervisor starts");
        raw_sup = Some(sup);
    })
    .await;

    let mut scratch = Vec::new();
    warden.restarts(warmup, &mut scratch).await;
    raw.restarts(warmup, &mut scratch).await;

    let mut out = RestartRun {
        warden: Vec::with_capacity(total),
        raw: Vec::with_capacity(total),
    };
    let mut done = 0;
    while done < total {
        let n = block.min(total - done);
        raw.restarts(n, &mut out.raw).await;
        warden.restarts(n, &mut out.warden).await;
        done += n;
    }

    for tree in &trees {
        tree.shutdown(Duration::from_secs(10)).await;
    }
    if let Some(sup) = raw_sup {
        let _ = sup
            .get_cell()
            .stop_and_wait(None, Some(Duration::from_secs(10)))
            .await;
    }
    out
}

async fn bench_restart(report: &mut Report, size: Size) {
    let (warmup, total, block) = size.pick((10, 100, 25), (100, 1_000, 250), (500, 5_000, 500));
    println!(
        "\n== restart latency: {total} restarts each, {warmup} warm-up, blocks of {block} alternating =="
    );
    let policy = Policy {
        backoff: Backoff::ZERO,
        ..Policy::default()
    };
    let run = restart_latency(policy.clone(), warmup, total, block).await;
    let (w, r) = (Stats::of(&run.warden), Stats::of(&run.raw));
    println!("{:<34} {:>10} {:>10} {:>10}", "", "p50", "p99", "max");
    println!(
        "{:<34} {:>10} {:>10} {:>10}",
        "raw ractor respawn",
        us(r.p50),
        us(r.p99),
        us(r.max)
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10}",
        "warden (default 60 s window)",
        us(w.p50),
        us(w.p99),
        us(w.max)
    );
    // Whether a restart gets dearer the longer a child crash-loops (it did while the
    // supervisor kept, and copied into every published view, every failure of the window).
    let first = Stats::of(&run.warden[..block.min(run.warden.len())]);
    let last = Stats::of(&run.warden[run.warden.len().saturating_sub(block)..]);
    println!(
        "warden, first vs last block of {block}: p50 {} → {}, p99 {} → {}",
        us(first.p50),
        us(last.p50),
        us(first.p99),
        us(last.p99)
    );

    // The same with a 1 ms window: the failure history the supervisor keeps (and copies into
    // every published view) stays a few entries long instead of up to its cap, which prices
    // that copy.
    let short = Policy {
        backoff: Backoff::ZERO,
        window: Duration::from_millis(1),
        ..Policy::default()
    };
    let run_short = restart_latency(short, warmup, total, block).await;
    let (ws, rs) = (Stats::of(&run_short.warden), Stats::of(&run_short.raw));
    println!(
        "{:<34} {:>10} {:>10} {:>10}",
        "raw ractor respawn (2nd pass)",
        us(rs.p50),
        us(rs.p99),
        us(rs.max)
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10}",
        "warden (1 ms window)",
        us(ws.p50),
        us(ws.p99),
        us(ws.max)
    );

    let ratio = w.p99 / r.p99;
    report.add(
        "restart",
        &format!("raw ractor respawn p50 / p99 (n={})", run.raw.len()),
        format!("{} / {}", us(r.p50), us(r.p99)),
        "baseline",
        None,
    );
    report.add(
        "restart",
        &format!("warden p50 / p99 (n={})", run.warden.len()),
        format!("{} / {}", us(w.p50), us(w.p99)),
        "",
        None,
    );
    report.add(
        "restart",
        "warden p99 ÷ raw p99",
        format!("{ratio:.2}×"),
        "≤ 2×",
        Some(ratio <= 2.0),
    );
    report.add(
        "restart",
        "warden p50 first → last block",
        format!("{} → {}", us(first.p50), us(last.p50)),
        "flat",
        None,
    );
    let ratio_short = ws.p99 / rs.p99;
    report.add(
        "restart",
        "1 ms window: warden p99 ÷ raw p99",
        format!("{ratio_short:.2}× ({} / {})", us(ws.p99), us(rs.p99)),
        "≤ 2×",
        Some(ratio_short <= 2.0),
    );
}

// ---------------------------------------------------------------------------------------
// 2. Start-slot throughput
// ---------------------------------------------------------------------------------------

/// A minimal FIFO semaphore actor with the same protocol (acquire with a oneshot reply,
/// release by a message from the guard's drop): the floor one ractor actor allows. With
/// `timers`, it also arms a `send_after` per grant and aborts one per release, as the
/// start-slot actor does for its hold timeout, to price that part alone.
struct RawSemaphore;

struct SemArgs {
    max: usize,
    timers: bool,
}

enum SemMsg {
    Acquire(oneshot::Sender<RawPermit>),
    Release,
    /// A hold timer fired (never, within a run).
    Expired,
}

struct RawPermit(Option<ActorRef<SemMsg>>);

impl Drop for RawPermit {
    fn drop(&mut self) {
        if let Some(actor) = self.0.take() {
            let _ = actor.send_message(SemMsg::Release);
        }
    }
}

/// A pending hold timer of the raw semaphore.
type SemTimer = ractor::concurrency::JoinHandle<Result<(), ractor::MessagingErr<SemMsg>>>;

struct SemState {
    free: usize,
    queue: VecDeque<oneshot::Sender<RawPermit>>,
    timers: Option<VecDeque<SemTimer>>,
}

impl RawSemaphore {
    fn grant(myself: &ActorRef<SemMsg>, state: &mut SemState) {
        while state.free > 0 {
            let Some(tx) = state.queue.pop_front() else {
                break;
            };
            if let Err(mut permit) = tx.send(RawPermit(Some(myself.clone()))) {
                permit.0 = None;
                continue;
            }
            state.free -= 1;
            if let Some(timers) = &mut state.timers {
                timers.push_back(myself.send_after(Duration::from_secs(30), || SemMsg::Expired));
            }
        }
    }
}

impl Actor for RawSemaphore {
    type Msg = SemMsg;
    type State = SemState;
    type Arguments = SemArgs;

    async fn pre_start(
        &self,
        _: ActorRef<SemMsg>,
        args: SemArgs,
    ) -> Result<SemState, ActorProcessingErr> {
        Ok(SemState {
            free: args.max,
            queue: VecDeque::new(),
            timers: args.timers.then(VecDeque::new),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SemMsg>,
        msg: SemMsg,
        state: &mut SemState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SemMsg::Acquire(tx) => state.queue.push_back(tx),
            SemMsg::Release => {
                state.free += 1;
                if let Some(timer) = state.timers.as_mut().and_then(VecDeque::pop_front) {
                    timer.abort();
                }
            }
            SemMsg::Expired => {}
        }
        Self::grant(&myself, state);
        Ok(())
    }
}

struct SlotRun {
    pairs: usize,
    elapsed: Duration,
    max_holders: usize,
}

impl SlotRun {
    fn rate(&self) -> f64 {
        self.pairs as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `tasks` tasks looping acquire → release until `total` pairs are done. With `hold`,
/// each task keeps its slot across a `yield_now`, so holders overlap and the cap is tested.
async fn slot_run<G, F>(tasks: usize, total: usize, hold: bool, acquire: F) -> SlotRun
where
    G: Send + 'static,
    F: Fn(String) -> std::pin::Pin<Box<dyn Future<Output = G> + Send>> + Send + Sync + 'static,
{
    let acquire = Arc::new(acquire);
    let remaining = Arc::new(AtomicI64::new(total as i64));
    let holding = Arc::new(AtomicUsize::new(0));
    let max_holders = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(tasks + 1));
    let mut set = JoinSet::new();
    for i in 0..tasks {
        let (acquire, remaining, holding, max_holders, barrier) = (
            acquire.clone(),
            remaining.clone(),
            holding.clone(),
            max_holders.clone(),
            barrier.clone(),
        );
        set.spawn(async move {
            let holder = format!("holder-{i}");
            barrier.wait().await;
            while remaining.fetch_sub(1, Ordering::Relaxed) > 0 {
                let guard = acquire(holder.clone()).await;
                let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                max_holders.fetch_max(now, Ordering::SeqCst);
                if hold {
                    tokio::task::yield_now().await;
                }
                holding.fetch_sub(1, Ordering::SeqCst);
                drop(guard);
            }
        });
    }
    barrier.wait().await;
    let start = Instant::now();
    while let Some(done) = set.join_next().await {
        done.expect("a slot task panicked");
    }
    SlotRun {
        pairs: total,
        elapsed: start.elapsed(),
        max_holders: max_holders.load(Ordering::SeqCst),
    }
}

async fn warden_slots(max_concurrent: usize, tasks: usize, total: usize, hold: bool) -> SlotRun {
    let settings = PoolSettings {
        max_concurrent,
        jitter: Duration::ZERO,
        hold_timeout: Duration::from_secs(30),
    };
    let (client, actor) =
        SlotClient::spawn_standalone(vec![("bench".into(), settings)], Jitter::fixed(0.0))
            .await
            .expect("the start-slot actor starts");
    let run = slot_run(tasks, total, hold, move |holder| {
        let client = client.clone();
        Box::pin(async move {
            client
                .acquire("bench", &holder, false)
                .await
                .expect("a slot is granted")
        })
    })
    .await;
    let _ = actor
        .get_cell()
        .stop_and_wait(None, Some(Duration::from_secs(10)))
        .await;
    run
}

async fn raw_slots(max_concurrent: usize, tasks: usize, total: usize, timers: bool) -> SlotRun {
    let args = SemArgs {
        max: max_concurrent,
        timers,
    };
    let (actor, _) = Actor::spawn(None, RawSemaphore, args)
        .await
        .expect("the semaphore starts");
    let sem = actor.clone();
    let run = slot_run(tasks, total, false, move |_holder| {
        let sem = sem.clone();
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            sem.send_message(SemMsg::Acquire(tx))
                .expect("the semaphore is alive");
            rx.await.expect("a permit is granted")
        })
    })
    .await;
    let _ = actor
        .get_cell()
        .stop_and_wait(None, Some(Duration::from_secs(10)))
        .await;
    run
}

async fn bench_slots(report: &mut Report, size: Size, floor: bool) {
    let (tasks, total) = size.pick((50, 2_000), (1_000, 100_000), (1_000, 500_000));
    println!("\n== start-slot throughput: {tasks} tasks, {total} acquire+release pairs per run ==");
    println!(
        "{:<50} {:>10} {:>10} {:>12}",
        "", "pairs/s", "elapsed", "max holders"
    );
    let line = |name: String, run: &SlotRun| {
        println!(
            "{:<50} {:>10.0} {:>8.2} s {:>12}",
            name,
            run.rate(),
            run.elapsed.as_secs_f64(),
            run.max_holders
        );
    };
    for max in [3usize, 8] {
        let w = warden_slots(max, tasks, total, false).await;
        line(format!("warden pool, max_concurrent={max}"), &w);
        // Holding across a yield makes holders overlap, so the cap is actually exercised.
        let h = warden_slots(max, tasks, total / 5, true).await;
        line(
            format!("warden pool, max_concurrent={max}, held over yield"),
            &h,
        );
        report.add(
            "slots",
            &format!("warden pairs/s (max_concurrent={max})"),
            format!("{:.0}", w.rate()),
            "≥ 200,000/s",
            Some(w.rate() >= 200_000.0),
        );
        report.add(
            "slots",
            &format!("max holders seen, tight loop (max={max})"),
            w.max_holders.to_string(),
            &format!("≤ {max}"),
            Some(w.max_holders <= max),
        );
        report.add(
            "slots",
            &format!("max holders seen, held over yield (max={max})"),
            format!("{} ({:.0} pairs/s)", h.max_holders, h.rate()),
            &format!("≤ {max}"),
            Some(h.max_holders <= max),
        );
        if floor {
            let r = raw_slots(max, tasks, total, false).await;
            line(format!("raw ractor semaphore, max={max}"), &r);
            let t = raw_slots(max, tasks, total, true).await;
            line(
                format!("raw semaphore + send_after per grant, max={max}"),
                &t,
            );
            report.add(
                "slots",
                &format!("raw ractor semaphore pairs/s (max={max})"),
                format!("{:.0}", r.rate()),
                "floor",
                None,
            );
            report.add(
                "slots",
                &format!("raw semaphore + timer task per grant (max={max})"),
                format!("{:.0}", t.rate()),
                "floor",
                None,
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// 3. Snapshot of a 10,000-child tree
// ---------------------------------------------------------------------------------------

/// A trivial leaf actor.
struct Leaf;

impl Actor for Leaf {
    type Msg = ();
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
}

fn leaf_spec(id: String) -> ChildSpec {
    ChildSpec::new(id, "leaf", Restart::Permanent, |ctx| async move {
        let (a, _) = Actor::spawn_linked(None, Leaf, (), ctx.supervisor.clone()).await?;
        Ok(a.get_cell())
    })
}

/// An actor that answers pings: the probe of "are actors still served on time".
struct Echo;

impl Actor for Echo {
    type Msg = RpcReplyPort<()>;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<Self::Msg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        reply: RpcReplyPort<()>,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        let _ = reply.send(());
        Ok(())
    }
}

fn running_leaves(snapshot: &NodeSnapshot) -> usize {
    snapshot
        .walk()
        .into_iter()
        .filter(|n| &*n.kind == "leaf" && n.state == NodeState::Running)
        .count()
}

/// How snapshots are taken while actors are probed.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    None,
    /// Back to back in a task on a runtime worker (what an async handler would do).
    Worker,
    /// Back to back on tokio's blocking pool.
    Blocking,
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Load::None => "no snapshots",
            Load::Worker => "snapshots on a runtime worker",
            Load::Blocking => "snapshots in spawn_blocking",
        }
    }
}

struct Probe {
    ping: Stats,
    churn: Stats,
    /// How many restarts the churn loop made.
    churned: usize,
    snapshots: usize,
}

/// For `window`, pings an echo actor and restarts one leaf through its supervisor in a
/// loop, while snapshots are taken per `load`.
async fn probe_actors(
    handle: &TreeHandle,
    echo: &ActorRef<RpcReplyPort<()>>,
    churn_path: &str,
    load: Load,
    window: Duration,
) -> Probe {
    let stop = Arc::new(AtomicBool::new(false));
    let snapshots = Arc::new(AtomicUsize::new(0));
    let mut loader = None;
    if load != Load::None {
        let (stop, snapshots, handle) = (stop.clone(), snapshots.clone(), handle.clone());
        loader = Some(match load {
            Load::Blocking => tokio::task::spawn_blocking(move || {
                while !stop.load(Ordering::Relaxed) {
                    drop(handle.snapshot());
                    snapshots.fetch_add(1, Ordering::Relaxed);
                }
            }),
            _ => tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    drop(handle.snapshot());
                    snapshots.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            }),
        });
    }

    let churn = {
        let (handle, path, stop) = (handle.clone(), churn_path.to_string(), stop.clone());
        tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                handle
                    .control(&path, ControlAction::Restart)
                    .await
                    .expect("the leaf restarts");
                lat.push(t.elapsed());
            }
            lat
        })
    };

    let mut pings = Vec::new();
    let end = Instant::now() + window;
    while Instant::now() < end {
        let t = Instant::now();
        echo.call(|r| r, None)
            .await
            .expect("the echo actor answers");
        pings.push(t.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    let churn = churn.await.expect("the churn task ends");
    if let Some(loader) = loader {
        loader.await.expect("the snapshot task ends");
    }
    Probe {
        ping: Stats::of(&pings),
        churn: Stats::of(&churn),
        churned: churn.len(),
        snapshots: snapshots.load(Ordering::Relaxed),
    }
}

async fn snapshot_shape(
    report: &mut Report,
    shape: &str,
    specs: Vec<ChildSpec>,
    leaves: usize,
    churn_path: &str,
    size: Size,
) {
    println!("\n== snapshot, {shape} ({leaves} leaves) ==");
    let rss_before = rss_kib();
    let t = Instant::now();
    let tree = Tree::start(
        specs,
        TreeOptions {
            jitter: Jitter::fixed(0.0),
            ..Default::default()
        },
    )
    .await
    .expect("the tree starts");
    let handle = tree.handle();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if running_leaves(&handle.snapshot()) == leaves {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the tree did not come up within 300 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let built = t.elapsed();
    let rss_after = rss_kib();
    let per_leaf = (rss_after.saturating_sub(rss_before) as f64 * 1024.0) / leaves as f64;
    println!(
        "built in {:.2} s; RSS {} MiB → {} MiB (+{:.1} KiB per leaf)",
        built.as_secs_f64(),
        rss_before / 1024,
        rss_after / 1024,
        per_leaf / 1024.0
    );

    let reads = size.pick(5, 50, 200);
    let mut read = Vec::with_capacity(reads);
    let mut encode = Vec::with_capacity(reads);
    let mut bytes = 0;
    for _ in 0..reads {
        let t = Instant::now();
        let snapshot = handle.snapshot();
        read.push(t.elapsed());
        let t = Instant::now();
        let json = serde_json::to_vec(&snapshot).expect("the snapshot encodes");
        encode.push(t.elapsed());
        bytes = json.len();
    }
    let (r, e) = (Stats::of(&read), Stats::of(&encode));
    println!(
        "snapshot() over {reads}: p50 {} p99 {} max {}",
        ms(r.p50),
        ms(r.p99),
        ms(r.max)
    );
    println!(
        "serde_json::to_vec: p50 {} p99 {} max {} ({:.1} MiB)",
        ms(e.p50),
        ms(e.p99),
        ms(e.max),
        bytes as f64 / 1048576.0
    );

    let (echo, _) = Actor::spawn(None, Echo, ())
        .await
        .expect("the echo actor starts");
    let window = Duration::from_millis(size.pick(100, 500, 2_000));
    let mut probes = Vec::new();
    for load in [Load::None, Load::Worker, Load::Blocking] {
        let p = probe_actors(&handle, &echo, churn_path, load, window).await;
        println!(
            "{:<30} ping p50 {} p99 {} max {} | control restart p50 {} p99 {} max {} | {} snapshots",
            load.name(),
            us(p.ping.p50),
            us(p.ping.p99),
            us(p.ping.max),
            us(p.churn.p50),
            us(p.churn.p99),
            us(p.churn.max),
            p.snapshots
        );
        probes.push((load, p));
    }
    let _ = echo
        .get_cell()
        .stop_and_wait(None, Some(Duration::from_secs(5)))
        .await;
    // Each operator restart starts a new incarnation: the generation proves they happened.
    let churned: u64 = probes.iter().map(|(_, p)| p.churned as u64).sum();
    let generation = handle
        .snapshot()
        .find(churn_path)
        .map_or(0, |n| n.generation);
    println!("{churn_path}: generation {generation} after {churned} operator restarts");
    assert_eq!(
        generation,
        churned + 1,
        "every operator restart starts a new incarnation"
    );

    let t = Instant::now();
    let shutdown = tree.shutdown(Duration::from_secs(120)).await;
    println!(
        "shutdown in {:.2} s (graceful: {})",
        t.elapsed().as_secs_f64(),
        shutdown.graceful
    );

    let b = format!("snapshot {shape}");
    report.add(
        &b,
        "tree up (all leaves running)",
        format!("{:.2} s", built.as_secs_f64()),
        "",
        None,
    );
    report.add(
        &b,
        "RSS with tree (before → after)",
        format!(
            "{} → {} MiB ({:.1} KiB/leaf)",
            rss_before / 1024,
            rss_after / 1024,
            per_leaf / 1024.0
        ),
        "",
        None,
    );
    report.add(
        &b,
        &format!("snapshot() p50 / p99 / max (n={reads})"),
        format!("{} / {} / {}", ms(r.p50), ms(r.p99), ms(r.max)),
        "p99 ≤ 10 ms",
        Some(r.p99 <= 10_000.0),
    );
    report.add(
        &b,
        "serde_json::to_vec p50 / p99",
        format!(
            "{} / {} ({:.1} MiB)",
            ms(e.p50),
            ms(e.p99),
            bytes as f64 / 1048576.0
        ),
        "",
        None,
    );
    for (load, p) in &probes {
        report.add(
            &b,
            &format!("echo ping p99 / max, {}", load.name()),
            format!("{} / {}", us(p.ping.p99), us(p.ping.max)),
            "",
            None,
        );
        report.add(
            &b,
            &format!("control restart p99 / max, {}", load.name()),
            format!("{} / {}", us(p.churn.p99), us(p.churn.max)),
            "",
            None,
        );
    }
    report.add(
        &b,
        "shutdown",
        format!("{:.2} s", t.elapsed().as_secs_f64()),
        "",
        None,
    );
}

async fn bench_snapshot_flat(report: &mut Report, size: Size) {
    let n = size.pick(500, 10_000, 10_000);
    let leaves = (0..n).map(|i| leaf_spec(format!("c-{i}"))).collect();
    let flat = vec![ChildSpec::supervisor("sup", Strategy::OneForOne, leaves)];
    let shape = format!("1 × {n}");
    snapshot_shape(report, &shape, flat, n, "root/sup/c-17", size).await;
}

async fn bench_snapshot_nested(report: &mut Report, size: Size) {
    let (sups, per) = size.pick((10, 50), (100, 100), (100, 100));
    let nested = (0..sups)
        .map(|s| {
            let leaves = (0..per).map(|i| leaf_spec(format!("c-{i}"))).collect();
            ChildSpec::supervisor(format!("s-{s}"), Strategy::OneForOne, leaves)
        })
        .collect();
    let shape = format!("{sups} × {per}");
    snapshot_shape(report, &shape, nested, sups * per, "root/s-7/c-17", size).await;
}

/// The same number of leaves spawned with bare ractor, linked to one idle parent: what the
/// actors themselves cost, apart from the supervisor's records and published views.
async fn bench_rss_raw(report: &mut Report, size: Size) {
    let n = size.pick(500, 10_000, 10_000);
    let before = rss_kib();
    let (parent, _) = Actor::spawn(None, Leaf, ())
        .await
        .expect("the parent starts");
    let mut leaves = Vec::with_capacity(n);
    for _ in 0..n {
        let (leaf, _) = Actor::spawn_linked(None, Leaf, (), parent.get_cell())
            .await
            .expect("a leaf starts");
        leaves.push(leaf);
    }
    let after = rss_kib();
    let per_leaf = after.saturating_sub(before) as f64 / leaves.len() as f64;
    println!(
        "\n== raw ractor, {n} linked leaves ==\nRSS {} MiB → {} MiB (+{per_leaf:.1} KiB per leaf)",
        before / 1024,
        after / 1024
    );
    report.add(
        "rss raw ractor",
        &format!("RSS with {n} bare linked leaves (before → after)"),
        format!(
            "{} → {} MiB ({per_leaf:.1} KiB/leaf)",
            before / 1024,
            after / 1024
        ),
        "baseline",
        None,
    );
    let _ = parent
        .get_cell()
        .stop_and_wait(None, Some(Duration::from_secs(10)))
        .await;
}

/// Runs one snapshot shape in a fresh process of this binary, so the RSS it reports is not
/// flattered by memory an earlier shape freed and the allocator kept.
fn snapshot_in_child(report: &mut Report, section: &str, size: Size) {
    let exe = std::env::current_exe().expect("the bench knows its own path");
    let out = std::process::Command::new(exe)
        .args([section, size.word(), ROWS_FLAG])
        .output()
        .expect("the bench runs itself");
    assert!(
        out.status.success(),
        "{section} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        match line
            .strip_prefix("ROW\t")
            .map(|r| r.split('\t').collect::<Vec<_>>())
        {
            Some(f) if f.len() == 5 => report.rows.push(Row {
                bench: f[0].to_string(),
                metric: f[1].to_string(),
                value: f[2].to_string(),
                goal: f[3].to_string(),
                verdict: match f[4] {
                    "PASS" => "PASS",
                    "FAIL" => "FAIL",
                    _ => "",
                },
            }),
            _ => println!("{line}"),
        }
    }
}

// ---------------------------------------------------------------------------------------

/// Tells a child run of this binary to print its rows for the parent instead of a table.
const ROWS_FLAG: &str = "--rows";

fn main() {
    // `cargo bench` passes `--bench`; `cargo test` does not, and gets a smoke run. Words
    // select sections (restart, slots, slots-warden: without the raw floor, for profiling,
    // snapshot, snapshot-flat, snapshot-nested, rss-raw) and a size (smoke, quick, full).
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rows_only = args.iter().any(|a| a == ROWS_FLAG);
    let words: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let size = [Size::Smoke, Size::Quick, Size::Full]
        .into_iter()
        .find(|s| words.contains(&s.word()))
        .unwrap_or(if args.iter().any(|a| a == "--bench") {
            Size::Full
        } else {
            Size::Smoke
        });
    let sections: Vec<&str> = words
        .iter()
        .copied()
        .filter(|w| !["smoke", "quick", "full"].contains(w))
        .collect();
    let want = |s: &str| sections.is_empty() || sections.contains(&s);
    let only = |s: &str| sections.contains(&s);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    let mut report = Report {
        no_verdicts: size == Size::Smoke,
        ..Report::default()
    };
    if !rows_only {
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!("load average at start: {}", load.trim());
        if size == Size::Smoke {
            println!("smoke run (toy sizes): use `cargo bench` for figures");
        }
    }
    runtime.block_on(async {
        if want("restart") {
            bench_restart(&mut report, size).await;
        }
        if want("slots") {
            bench_slots(&mut report, size, true).await;
        }
        if only("slots-warden") {
            bench_slots(&mut report, size, false).await;
        }
        if only("snapshot-flat") {
            bench_snapshot_flat(&mut report, size).await;
        }
        if only("snapshot-nested") {
            bench_snapshot_nested(&mut report, size).await;
        }
        if only("rss-raw") {
            bench_rss_raw(&mut report, size).await;
        }
    });
    drop(runtime);
    if want("snapshot") {
        for section in ["snapshot-flat", "snapshot-nested", "rss-raw"] {
            snapshot_in_child(&mut report, section, size);
        }
    }
    if rows_only {
        report.print_rows();
    } else {
        report.print();
    }
}
