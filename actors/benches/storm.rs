//! The approval-handler handshake storm of issue 6 (see `BENCHMARKS.md`, "Approval handler
//! storm (issue 6)").
//!
//! N approval handlers (`matrix::approvals`, with [`NoChannel`]: no Matrix side) start on the
//! same tick against an in-process gateway whose every handshake burns 20 ms of CPU
//! ([`GatewayState::set_handshake_cost`], a stand-in for a loaded gateway). One tree, built
//! the way `warden run` builds it, on one tokio runtime with a worker per core:
//!
//! ```text
//! root                          one_for_one
//! ├── start_slots               pool `approvals`
//! ├── gateway                   listener on 127.0.0.1:0, approvals broker, sessions
//! └── channels/matrix/acct-<i>  one per account, each with its `approvals` handler
//! ```
//!
//! Each N runs **coordinated** (the `approvals` pool's defaults: `max_concurrent` 3, jitter
//! 2000 ms on first starts, hold timeout 30 s) and **uncoordinated** (`max_concurrent` N, no
//! jitter: every handler handshakes at once), both against the gateway's defaults
//! (`max_preauth_per_ip` 32, `handshake_timeout_ms` 10000); then **unguarded**: uncoordinated
//! against a gateway whose pre-auth budget does not bind (`max_preauth_per_ip` 1024, as if
//! every handler came from its own address), the storm with neither defence. Handlers use
//! the built-in `approval_handler` policy (1 s → 60 s ×2, jitter 0.2, reset 60 s, unlimited).
//!
//! Reported per run: time from `Tree::start` until every handler is ready (tree snapshot),
//! or how many were after the cap (120 s); the first upgrade and the last `hello-ok` seen
//! by the gateway (sampled every 2 ms); handshake timeouts (gateway 4408 closes, and client
//! side "no hello" failures), 503s, the peak of sockets handshaking at once (an exact
//! counter in the gateway), handler restarts by cause, the ideal
//! N × cost / min(max_concurrent, cores), this process's CPU time and that of everything
//! else on the machine over the run (`/proc/stat`: other load skews the figures).
//!
//! Restart causes come from the kernel's `Restarting after failure.` WARN: the bench
//! installs a tracing subscriber that sees only that callsite and counts its `error` field
//! by kind. No other subscriber and no metrics recorder are installed.
//!
//! `cargo bench -p warden-actors --bench storm [-- quick | 100 | 1000 | coordinated |
//! uncoordinated | unguarded | cap=SECS | cost=MS]`. Under `cargo test` (no `--bench`) it runs 10 handlers with a
//! 5 ms cost and a 200 ms jitter as a smoke test, with no verdicts.

#![expect(
    clippy::print_stdout,
    reason = "a benchmark reports its figures on stdout"
)]

#[expect(
    dead_code,
    reason = "this bench uses the table and the sizes, not the percentiles"
)]
mod common;

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use common::{Report, Size};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, span};
use warden_actors::gateway::{
    self, ApprovalsSettings, GatewaySettings, GatewayState, HandshakeStats, listener,
};
use warden_actors::matrix::approvals::{
    self, ApprovalChannel, GatewayAddr, HandlerConfig, NoChannel,
};
use warden_actors::supervision::{
    ChildSpec, NodeSnapshot, NodeState, PoolSettings, SlotClient, Strategy, Tree, TreeOptions,
};

const TOKEN: &str = "storm-token";

/// How often the gateway's counts are sampled.
const SAMPLE: Duration = Duration::from_millis(2);

// ---------------------------------------------------------------------------------------
// Restart causes, from the kernel's WARN
// ---------------------------------------------------------------------------------------

/// Handler restarts by cause, counted from the kernel's "Restarting after failure." events.
#[derive(Default)]
struct Causes {
    /// HTTP 503: no pre-auth slot.
    busy: AtomicU64,
    /// The gateway closed the handshake with 4408.
    closed_4408: AtomicU64,
    /// The client gave up: no `hello-ok` within the handler's handshake timeout.
    client_timeout: AtomicU64,
    /// 1013: the gateway was still starting.
    starting: AtomicU64,
    /// Anything else.
    other: AtomicU64,
    /// The first "anything else", to say what it was.
    other_example: Mutex<Option<String>>,
}

/// What one run's restarts were.
#[derive(Debug, Clone, Default)]
struct CauseCounts {
    busy: u64,
    closed_4408: u64,
    client_timeout: u64,
    starting: u64,
    other: u64,
    other_example: Option<String>,
}

impl fmt::Display for CauseCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = [
            ("503", self.busy),
            ("4408", self.closed_4408),
            ("client timeout", self.client_timeout),
            ("1013", self.starting),
            ("other", self.other),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(what, n)| format!("{what} {n}"))
        .collect();
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

impl Causes {
    fn count(&self, error: &str) {
        let counter = if error.contains("HTTP 503") {
            &self.busy
        } else if error.contains("(4408)") {
            &self.closed_4408
        } else if error.contains("no hello from the gateway within") {
            &self.client_timeout
        } else if error.contains("(1013)") {
            &self.starting
        } else {
            let mut example = self
                .other_example
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            example.get_or_insert_with(|| error.to_string());
            &self.other
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// This run's counts; starts the next run from zero.
    fn take(&self) -> CauseCounts {
        let take = |c: &AtomicU64| c.swap(0, Ordering::Relaxed);
        CauseCounts {
            busy: take(&self.busy),
            closed_4408: take(&self.closed_4408),
            client_timeout: take(&self.client_timeout),
            starting: take(&self.starting),
            other: take(&self.other),
            other_example: self
                .other_example
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        }
    }
}

/// A tracing subscriber interested in one callsite: the supervisor's WARN events.
struct RestartLog(Arc<Causes>);

impl RestartLog {
    fn wanted(meta: &Metadata<'_>) -> bool {
        meta.is_event()
            && *meta.level() == Level::WARN
            && meta.target() == "warden_actors::supervision::supervisor"
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    error: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "error" => self.error = format!("{value:?}"),
            _ => {}
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "error" => self.error = value.to_string(),
            _ => {}
        }
    }
}

impl tracing::Subscriber for RestartLog {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if Self::wanted(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        Self::wanted(meta)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::WARN)
    }

    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }

    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}

    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        if fields.message == "Restarting after failure." {
            self.0.count(&fields.error);
        }
    }

    fn enter(&self, _: &span::Id) {}

    fn exit(&self, _: &span::Id) {}
}

// ---------------------------------------------------------------------------------------
// One run
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The `approvals` pool's defaults.
    Coordinated,
    /// `max_concurrent` = N, no jitter.
    Uncoordinated,
    /// Uncoordinated, and a pre-auth budget that does not bind.
    Unguarded,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Coordinated, Mode::Uncoordinated, Mode::Unguarded];

    /// The word that selects it on the command line.
    fn as_str(self) -> &'static str {
        match self {
            Mode::Coordinated => "coordinated",
            Mode::Uncoordinated => "uncoordinated",
            Mode::Unguarded => "unguarded",
        }
    }
}

/// `max_preauth_per_ip` of the unguarded runs: above any N here.
const UNGUARDED_PREAUTH: u32 = 1024;

/// What one run is.
struct Params {
    n: usize,
    mode: Mode,
    /// CPU each handshake burns in the gateway.
    cost: Duration,
    /// The `approvals` pool.
    pool: PoolSettings,
    /// Give up waiting after this long.
    cap: Duration,
    /// Runtime workers (= cores).
    cores: usize,
    /// The gateway's pre-auth budget per IP.
    max_preauth: u32,
}

impl Params {
    /// N × cost / min(max_concurrent, cores).
    fn ideal(&self) -> Duration {
        let lanes = self.pool.max_concurrent.min(self.cores).max(1);
        self.cost * u32::try_from(self.n).unwrap_or(u32::MAX) / u32::try_from(lanes).unwrap_or(1)
    }
}

/// What one run gave.
struct Outcome {
    /// Handlers ready at the end.
    ready: usize,
    /// From `Tree::start` until every handler was ready.
    all_ready: Option<Duration>,
    /// From `Tree::start` to the first socket the gateway saw handshaking.
    first_upgrade: Option<Duration>,
    /// From `Tree::start` until N approver sessions were authenticated.
    last_hello: Option<Duration>,
    /// When 10 %, 50 %, 90 % of the handlers were authenticated.
    milestones: [Option<Duration>; 3],
    stats: HandshakeStats,
    /// Sum of the handlers' `restarts_total`.
    restarts: u64,
    causes: CauseCounts,
    /// At the cap: handlers backing off, the longest pending restart delay (ms), the most
    /// failures in a row.
    at_cap: Option<(usize, u64, u32)>,
    /// How long `Tree::start` took (handlers that connect before it returned get 1013).
    tree_start: Duration,
    /// This process's CPU time over the run.
    cpu: Duration,
    /// CPU time of everything else on the machine over the run.
    others_cpu: Duration,
    /// How long the shutdown of the tree took.
    shutdown: Duration,
}

/// The handlers in a snapshot.
fn handlers(snapshot: &NodeSnapshot) -> Vec<&NodeSnapshot> {
    snapshot
        .walk()
        .into_iter()
        .filter(|node| &*node.kind == approvals::KIND)
        .collect()
}

/// User + system CPU time of this process (`/proc/self/stat`, clock ticks of 10 ms).
fn process_cpu() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = f.get(11)?.parse().ok()?;
            let stime: u64 = f.get(12)?.parse().ok()?;
            Some(utime + stime)
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// Busy CPU time of the whole machine (`/proc/stat`: all but idle and iowait, in clock
/// ticks of 10 ms).
fn machine_cpu() -> Duration {
    let ticks = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.strip_prefix("cpu ")?.to_string();
            let f: Vec<u64> = line
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal (guest time is in user).
            let busy: u64 = f.iter().take(8).sum::<u64>() - f.get(3)? - f.get(4)?;
            Some(busy)
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn opt_secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "—".to_string(), secs)
}

fn run(rt: &Runtime, p: &Params, causes: &Causes) -> Outcome {
    let _ = causes.take();
    let dir = std::env::temp_dir().join(format!(
        "warden-storm-{}-{}-{}",
        std::process::id(),
        p.n,
        p.mode.as_str()
    ));
    let _ = std::fs::remove_dir_all(&dir);

    let state = GatewayState::new(GatewaySettings {
        bind: SocketAddr::from(([127, 0, 0, 1], 0)),
        token: Some(TOKEN.to_string()),
        max_preauth_per_ip: p.max_preauth,
        ..GatewaySettings::default()
    });
    state.set_handshake_cost(p.cost);
    let _ = state.set_approvals(ApprovalsSettings::new(&dir));
    let handshake_timeout = Duration::from_millis(state.settings().handshake_timeout_ms);

    let slots = SlotClient::new();
    let bound = Arc::new(watch::Sender::new(None));
    let addr = GatewayAddr::Bound(bound.subscribe());
    let channel: Arc<dyn ApprovalChannel> = Arc::new(NoChannel);
    let accounts = (0..p.n)
        .map(|i| {
            let alias = format!("acct-{i}");
            let config = HandlerConfig {
                alias: alias.clone(),
                gateway: addr.clone(),
                token: state.add_approver(&alias).expose().to_string(),
                handshake_timeout,
            };
            let handler = approvals::spec(
                config,
                channel.clone(),
                slots.clone(),
                approvals::DEFAULT_POLICY,
            );
            ChildSpec::supervisor(alias, Strategy::RestForOne, vec![handler])
        })
        .collect();
    let children = vec![
        slots.spec("start_slots", vec![(approvals::POOL.to_string(), p.pool)]),
        gateway::spec(&state, listener::DEFAULT_POLICY, bound),
        ChildSpec::supervisor(
            "channels",
            Strategy::OneForOne,
            vec![ChildSpec::supervisor(
                "matrix",
                Strategy::OneForOne,
                accounts,
            )],
        ),
    ];

    let (cpu0, machine0) = (process_cpu(), machine_cpu());
    let t0 = Instant::now();
    let tree = rt
        .block_on(Tree::start(children, TreeOptions::default()))
        .expect("the storm tree starts");
    // As `warden run` does: sockets that arrive before this get 1013.
    let _ = state.set_tree(tree.handle());
    let tree_start = t0.elapsed();
    let handle = tree.handle();

    let deadline = t0 + p.cap;
    let (mut first_upgrade, mut last_hello, mut all_ready) = (None, None, None);
    let mut milestones = [None; 3];
    let mut ready = 0;
    let mut next_snapshot = t0;
    let mut next_progress = t0 + Duration::from_secs(10);
    loop {
        let now = Instant::now();
        let (_, _, approvers, handshaking) = state.counts();
        let approvers = usize::try_from(approvers).unwrap_or(usize::MAX);
        if first_upgrade.is_none() && (handshaking > 0 || approvers > 0) {
            first_upgrade = Some(now - t0);
        }
        for (slot, pct) in milestones.iter_mut().zip([10, 50, 90]) {
            if slot.is_none() && approvers * 100 >= p.n * pct {
                *slot = Some(now - t0);
            }
        }
        if last_hello.is_none() && approvers >= p.n {
            last_hello = Some(now - t0);
        }
        // Every 100 ms, and at every sample once every handler has authenticated.
        if now >= next_snapshot || approvers >= p.n {
            let snapshot = handle.snapshot();
            ready = handlers(&snapshot).iter().filter(|h| h.ready).count();
            if ready == p.n {
                all_ready = Some(now - t0);
                break;
            }
            next_snapshot = now + Duration::from_millis(100);
        }
        if now >= deadline {
            break;
        }
        if now >= next_progress {
            let stats = state.handshake_stats();
            println!(
                "  {:>5.1} s: {ready} of {} ready, {approvers} authenticated, {handshaking} \
                 handshaking; so far {} × 503, {} × 4408",
                (now - t0).as_secs_f64(),
                p.n,
                stats.preauth_rejections,
                stats.handshake_timeouts
            );
            next_progress += Duration::from_secs(10);
        }
        std::thread::sleep(SAMPLE);
    }
    let cpu = process_cpu().saturating_sub(cpu0);
    let others_cpu = machine_cpu().saturating_sub(machine0).saturating_sub(cpu);
    let stats = state.handshake_stats();
    let snapshot = handle.snapshot();
    let hs = handlers(&snapshot);
    let restarts = hs.iter().map(|h| h.restarts_total).sum();
    let at_cap = all_ready.is_none().then(|| {
        let backing_off = hs
            .iter()
            .filter(|h| h.state == NodeState::BackingOff)
            .count();
        let longest = hs
            .iter()
            .filter_map(|h| h.next_restart_in_ms)
            .max()
            .unwrap_or(0);
        let streak = hs.iter().map(|h| h.consecutive_failures).max().unwrap_or(0);
        (backing_off, longest, streak)
    });
    let causes = causes.take();

    let t = Instant::now();
    let report = rt.block_on(tree.shutdown(Duration::from_secs(60)));
    let shutdown = t.elapsed();
    if !report.graceful {
        println!("  shutdown not graceful: {:?}", report.still_running);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Outcome {
        ready,
        all_ready,
        first_upgrade,
        last_hello,
        milestones,
        stats,
        restarts,
        causes,
        at_cap,
        tree_start,
        cpu,
        others_cpu,
        shutdown,
    }
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

fn report_run(report: &mut Report, p: &Params, o: &Outcome) {
    let coordinated = p.mode == Mode::Coordinated;
    let label = match p.mode {
        Mode::Unguarded => format!("unguarded (preauth {})", p.max_preauth),
        mode => mode.as_str().to_string(),
    };
    let ideal = p.ideal();
    let lanes = p.pool.max_concurrent.min(p.cores);
    let ratio = |d: Duration| d.as_secs_f64() / ideal.as_secs_f64();
    // The last first start joins the queue up to `jitter` after the tree started.
    let with_jitter = ideal.max(p.pool.jitter + p.cost);
    let bench = format!("storm N={} {label}", p.n);

    println!(
        "  all ready: {}; first upgrade {}, last hello-ok {}; 10/50/90 % authenticated at {} / \
         {} / {}",
        o.all_ready.map_or_else(
            || format!("not all after {}: {}/{}", secs(p.cap), o.ready, p.n),
            secs
        ),
        opt_secs(o.first_upgrade),
        opt_secs(o.last_hello),
        opt_secs(o.milestones[0]),
        opt_secs(o.milestones[1]),
        opt_secs(o.milestones[2]),
    );
    println!(
        "  gateway: peak {} handshaking, {} × 503, {} × 4408; handlers: {} restarts ({}); \
         CPU {} (others on the machine: {}); Tree::start {} ms; shutdown {}",
        o.stats.handshaking_peak,
        o.stats.preauth_rejections,
        o.stats.handshake_timeouts,
        o.restarts,
        o.causes,
        secs(o.cpu),
        secs(o.others_cpu),
        o.tree_start.as_millis(),
        secs(o.shutdown),
    );
    if let Some(example) = &o.causes.other_example {
        println!("  an 'other' restart cause: {example}");
    }
    if let Some((backing_off, longest, streak)) = o.at_cap {
        println!(
            "  at the cap: {backing_off} handlers backing off, longest pending delay {:.1} s, \
             up to {streak} failures in a row",
            longest as f64 / 1000.0
        );
    }

    let goal_time = format!("≤ 1.2 × ideal = {}", secs(ideal.mul_f64(1.2)));
    let total = match o.all_ready {
        Some(d) => format!("{} = {:.2} × ideal", secs(d), ratio(d)),
        None => format!(
            "not all connected after {}: {}/{}",
            secs(p.cap),
            o.ready,
            p.n
        ),
    };
    report.add(
        &bench,
        "start → all ready",
        total,
        if coordinated { &goal_time } else { "" },
        coordinated.then(|| o.all_ready.is_some_and(|d| ratio(d) <= 1.2)),
    );
    report.add(
        &bench,
        "ideal N × cost / min(max_concurrent, cores)",
        format!(
            "{} × {} ms / {lanes} = {}",
            p.n,
            p.cost.as_millis(),
            secs(ideal)
        ),
        "",
        None,
    );
    if coordinated && !p.pool.jitter.is_zero() {
        report.add(
            &bench,
            "ideal with first-start jitter: max(ideal, jitter + cost)",
            match o.all_ready {
                Some(d) => format!(
                    "{}; total = {:.2} ×",
                    secs(with_jitter),
                    d.as_secs_f64() / with_jitter.as_secs_f64()
                ),
                None => secs(with_jitter),
            },
            "",
            None,
        );
    }
    let span = o
        .first_upgrade
        .zip(o.last_hello)
        .map(|(a, b)| b.saturating_sub(a));
    report.add(
        &bench,
        "first upgrade → last hello-ok (gateway, 2 ms samples)",
        span.map_or_else(
            || "—".to_string(),
            |d| format!("{} = {:.2} × ideal", secs(d), ratio(d)),
        ),
        "",
        None,
    );
    report.add(
        &bench,
        "handshake timeouts: 4408 (gateway) / client-side",
        format!(
            "{} / {}",
            o.stats.handshake_timeouts, o.causes.client_timeout
        ),
        if coordinated { "0" } else { "" },
        coordinated.then_some(o.stats.handshake_timeouts == 0 && o.causes.client_timeout == 0),
    );
    report.add(
        &bench,
        &format!("503s (pre-auth refusals, budget {})", p.max_preauth),
        o.stats.preauth_rejections.to_string(),
        if coordinated { "0" } else { "" },
        coordinated.then_some(o.stats.preauth_rejections == 0),
    );
    let cap = format!("≤ {}", p.pool.max_concurrent);
    report.add(
        &bench,
        "peak concurrent handshakes (exact)",
        o.stats.handshaking_peak.to_string(),
        if coordinated { &cap } else { "" },
        coordinated.then_some(o.stats.handshaking_peak <= p.pool.max_concurrent as u64),
    );
    report.add(
        &bench,
        "handler restarts (by cause)",
        format!("{} ({})", o.restarts, o.causes),
        "",
        None,
    );
    report.add(
        &bench,
        "CPU: this process / other processes",
        format!("{} / {}", secs(o.cpu), secs(o.others_cpu)),
        "",
        None,
    );
}

// ---------------------------------------------------------------------------------------

fn main() {
    let causes = Arc::new(Causes::default());
    tracing::subscriber::set_global_default(RestartLog(causes.clone()))
        .expect("no other subscriber is installed");

    // `cargo bench` passes `--bench`; `cargo test` does not, and gets a smoke run. Words
    // select sizes (100, 1000), modes (coordinated, uncoordinated), a size (smoke, quick,
    // full), the cap (`cap=SECS`) and the handshake cost (`cost=MS`).
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let size = if words.contains(&"smoke") {
        Size::Smoke
    } else if words.contains(&"quick") {
        Size::Quick
    } else if words.contains(&"full") || args.iter().any(|a| a == "--bench") {
        Size::Full
    } else {
        Size::Smoke
    };
    let picked: Vec<usize> = words.iter().filter_map(|w| w.parse().ok()).collect();
    let sizes = if picked.is_empty() {
        size.pick(vec![10], vec![100], vec![100, 1_000])
    } else {
        picked
    };
    let named = words
        .iter()
        .any(|w| Mode::ALL.iter().any(|m| m.as_str() == *w));
    let modes: Vec<Mode> = Mode::ALL
        .into_iter()
        .filter(|m| !named || words.contains(&m.as_str()))
        .collect();
    let cap = words
        .iter()
        .find_map(|w| w.strip_prefix("cap=")?.parse().ok())
        .map_or(
            Duration::from_secs(size.pick(30, 120, 120)),
            Duration::from_secs,
        );
    let cost = words
        .iter()
        .find_map(|w| w.strip_prefix("cost=")?.parse().ok())
        .map_or(
            Duration::from_millis(size.pick(5, 20, 20)),
            Duration::from_millis,
        );
    // The `approvals` pool's defaults (`[start_slots.approvals]`); a smoke run shortens the
    // jitter.
    let defaults = PoolSettings {
        max_concurrent: 3,
        jitter: Duration::from_millis(size.pick(200, 2_000, 2_000)),
        hold_timeout: Duration::from_secs(30),
    };
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .thread_name("storm-worker")
        .enable_all()
        .build()
        .expect("a tokio runtime starts");

    let mut report = Report {
        no_verdicts: size == Size::Smoke,
        ..Report::default()
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at start: {}", load.trim());
    if size == Size::Smoke {
        println!("smoke run (toy sizes): use `cargo bench` for figures");
    }
    println!(
        "{cores} cores = {cores} runtime workers; handshake cost {} ms; gateway \
         handshake_timeout_ms 10000 (default); cap {}",
        cost.as_millis(),
        secs(cap)
    );
    for &n in &sizes {
        for &mode in &modes {
            let pool = match mode {
                Mode::Coordinated => defaults,
                Mode::Uncoordinated | Mode::Unguarded => PoolSettings {
                    max_concurrent: n,
                    jitter: Duration::ZERO,
                    ..defaults
                },
            };
            let max_preauth = match mode {
                Mode::Unguarded => UNGUARDED_PREAUTH,
                _ => GatewaySettings::default().max_preauth_per_ip,
            };
            let p = Params {
                n,
                mode,
                cost,
                pool,
                cap,
                cores,
                max_preauth,
            };
            println!(
                "\n== {n} approval handlers, {} (max_concurrent {}, jitter {} ms; \
                 max_preauth_per_ip {max_preauth}) ==",
                mode.as_str(),
                pool.max_concurrent,
                pool.jitter.as_millis()
            );
            let outcome = run(&rt, &p, &causes);
            report_run(&mut report, &p, &outcome);
        }
    }
    report.print();
}
