//! Benchmarks of the gateway against issue 4's goals (see `BENCHMARKS.md`, "Gateway").
//!
//! * `handshake` — full handshakes (`GatewayClient::connect`: TCP, WebSocket upgrade,
//!   `connect.challenge`, `connect`, `hello-ok`) then `close()`, by 16, 64 and 256
//!   concurrent clients, against the real `gateway::spec` subtree in a `Tree` in this
//!   process. Goal: ≥ 5,000 handshakes/s on 2 cores.
//! * `handshake-child` — the same against a `warden run` child process (the release binary,
//!   its default `info` logging going to a file), whose CPU time is its own.
//! * `idle` — 10,000 authenticated connections (operators, then nodes, each in a fresh
//!   `warden run` child) held idle for 10 s; the child's VmRSS. Goal: ≤ 300 MiB.
//! * `reconnect` — 1,000 in-process node connection actors (`node::connection`) against a
//!   `warden run` child that is SIGTERMed and started again on the same port 2 s later:
//!   each node's offline time, and the handshakes the gateway saw at once. Run with the
//!   default `max_preauth_per_ip` (32: every node shares 127.0.0.1) and with 1024. Goal: p99
//!   offline ≤ downtime + 1 s, never more handshakes than the budget.
//! * `inbox-append`, `inbox-replay`, `inbox-latency` — the durable inbox (`inbox/mod.rs`).
//!
//! Run with `cargo bench -p warden-actors --bench gateway [-- SECTION…] [-- quick]`, after
//! `cargo build --release --bin warden` for the child sections. The in-process gateway runs
//! on its own two-worker tokio runtime (threads `gw-*`), the clients and nodes on another
//! (`cl-*`), so each side's CPU time can be read from `/proc/self/task/*/schedstat`. No
//! tracing subscriber is installed in this process. Under `cargo test` (no `--bench`) every
//! section runs at toy sizes as a smoke test, with no verdicts; the child sections are
//! skipped when no `warden` binary sits beside the bench's directory.

#![expect(
    clippy::print_stdout,
    reason = "a benchmark reports its figures on stdout"
)]

mod common;
mod inbox;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use common::{Report, Size, Stats, ms};
use serde_json::json;
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio::task::JoinSet;
use warden_actors::gateway::client::{ConnectError, ConnectOptions, GatewayClient};
use warden_actors::gateway::protocol::{ClientInfo, NodeInfo, Role};
use warden_actors::gateway::{self, GatewaySettings, GatewayState};
use warden_actors::node::connection::{self, ConnectionConfig, NodeStatus};
use warden_actors::supervision::{ChildSpec, Jitter, Policy, Strategy, Tree, TreeOptions};

const TOKEN: &str = "bench-token";

/// Pre-auth allowance per IP in every bench gateway: all clients come from 127.0.0.1, and
/// the default (32) would answer 503 to most of 64 or 256 concurrent handshakes.
const MAX_PREAUTH: u32 = 1024;

/// Environment marker of a run re-executed under a raised `ulimit -n`.
const REEXEC_MARKER: &str = "WARDEN_BENCH_NOFILE_RAISED";

// ---------------------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------------------

/// Thousands separated by commas.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB.
fn status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| {
                v.trim_start_matches(':')
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// CPU time of this process's threads whose name starts with `prefix`, from each thread's
/// `schedstat` (nanoseconds on CPU). Threads that ended are not counted: the runtimes'
/// workers live as long as the bench.
fn threads_cpu(prefix: &str) -> Duration {
    let mut ns = 0u64;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        ns += std::fs::read_to_string(dir.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(0);
    }
    Duration::from_nanos(ns)
}

/// User + system CPU time of a whole process, ended threads included (`/proc/<pid>/stat`,
/// in clock ticks of 10 ms).
fn process_cpu(pid: u32) -> Duration {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = f.get(11)?.parse().ok()?;
            let stime: u64 = f.get(12)?.parse().ok()?;
            Some(utime + stime)
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// The soft and hard limits on open files.
fn nofile_limits() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let parse = |v: &str| {
        if v == "unlimited" {
            Some(u64::MAX)
        } else {
            v.parse().ok()
        }
    };
    Some((parse(f.get(3)?)?, parse(f.get(4)?)?))
}

/// Whether `need` files can be open.
fn nofile_ok(need: u64) -> bool {
    nofile_limits().is_none_or(|(soft, _)| soft >= need)
}

/// Makes sure `need` files can be open: re-executes the bench under `sh -c 'ulimit -n …'`
/// when the hard limit allows it (the workspace forbids the `unsafe` of `setrlimit`).
/// Returns false when the limit is too low and cannot be raised.
fn ensure_nofile(need: u64) -> bool {
    let Some((soft, hard)) = nofile_limits() else {
        return true;
    };
    if soft >= need {
        return true;
    }
    if hard < need || std::env::var_os(REEXEC_MARKER).is_some() {
        println!(
            "open-file limit {soft} (hard {hard}) is below the {need} this run needs: \
             run `ulimit -n {need}` (as root if the hard limit is lower) and try again"
        );
        return false;
    }
    println!("raising the open-file limit from {soft} to {need} (re-executing under sh)");
    let exe = std::env::current_exe().expect("the bench knows its own path");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {need} && exec \"$0\" \"$@\""))
        .arg(exe)
        .args(std::env::args().skip(1))
        .env(REEXEC_MARKER, "1")
        .status()
        .expect("sh runs");
    std::process::exit(status.code().unwrap_or(1));
}

// ---------------------------------------------------------------------------------------
// Gateways: in this process, or a `warden run` child
// ---------------------------------------------------------------------------------------

/// The `gateway` subtree the way `warden run` builds it, on the gateway runtime.
struct InProcess {
    tree: Tree,
    state: GatewayState,
    addr: SocketAddr,
}

impl InProcess {
    fn start(rt: &Runtime) -> InProcess {
        rt.block_on(async {
            let state = GatewayState::new(GatewaySettings {
                bind: SocketAddr::from(([127, 0, 0, 1], 0)),
                token: Some(TOKEN.to_string()),
                allow_unlisted_nodes: true,
                max_preauth_per_ip: MAX_PREAUTH,
                ..GatewaySettings::default()
            });
            let bound = Arc::new(watch::Sender::new(None));
            let spec = gateway::spec(&state, Policy::default(), bound.clone());
            let options = TreeOptions {
                jitter: Jitter::fixed(0.0),
                ..TreeOptions::default()
            };
            let tree = Tree::start(vec![spec], options)
                .await
                .expect("the gateway tree starts");
            assert!(
                state.set_tree(tree.handle()).is_ok(),
                "the tree is set once"
            );
            let addr = bound
                .borrow()
                .expect("the listener is bound once the tree has started");
            InProcess { tree, state, addr }
        })
    }

    fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    fn stop(self, rt: &Runtime) {
        rt.block_on(async {
            let report = self.tree.shutdown(Duration::from_secs(30)).await;
            assert!(report.graceful, "the gateway tree shuts down gracefully");
        });
    }
}

/// A `warden run` child process with a gateway on a loopback port.
struct WardenChild {
    child: Child,
    /// Where the config, the state and the logs are.
    dir: PathBuf,
    /// This process's log (`warden-<n>.log`).
    log: PathBuf,
    /// The gateway's port.
    port: u16,
    /// The admin endpoint's port (`/metrics`).
    admin_port: u16,
}

/// The `warden` binary beside the bench's directory (`target/<profile>/warden`).
fn warden_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let bin = profile_dir.join("warden");
    bin.is_file().then_some(bin)
}

/// A port nobody listens on right now (the listener is closed again at once).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl WardenChild {
    /// Starts `bin run` with a fresh config and directory on free ports, `max_preauth`
    /// handshaking sockets per IP; returns once a client gets `hello-ok`.
    fn start(bin: &Path, client_rt: &Runtime, label: &str, max_preauth: u32) -> WardenChild {
        let dir =
            std::env::temp_dir().join(format!("warden-gwbench-{}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("the bench's temp directory");
        let (port, admin_port) = (free_port(), free_port());
        let config = format!(
            "[gateway]\nbind = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\nallow_unlisted_nodes = true\n\
             max_preauth_per_ip = {max_preauth}\n\n\
             [admin]\nbind = \"127.0.0.1:{admin_port}\"\n\n[state]\ndir = \"{}\"\n",
            dir.join("state").display()
        );
        std::fs::write(dir.join("warden.toml"), config).expect("the bench writes the config");
        let me = WardenChild::spawn(bin, dir, 1, port, admin_port);
        me.wait_ready(client_rt)
    }

    /// Starts `bin run` with the config in `dir`; its log goes to `warden-<n>.log`.
    fn spawn(bin: &Path, dir: PathBuf, n: u32, port: u16, admin_port: u16) -> WardenChild {
        let log = dir.join(format!("warden-{n}.log"));
        let file = std::fs::File::create(&log).expect("the log file");
        let child = Command::new(bin)
            .arg("--config")
            .arg(dir.join("warden.toml"))
            .arg("run")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("the log file"))
            .stderr(file)
            .spawn()
            .expect("warden run starts");
        WardenChild {
            child,
            dir,
            log,
            port,
            admin_port,
        }
    }

    /// Waits until a client gets `hello-ok`; panics with the log after 30 s.
    fn wait_ready(mut self, client_rt: &Runtime) -> WardenChild {
        let url = self.url();
        let up = client_rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok((client, _)) =
                    GatewayClient::connect(&url, options(Role::Operator, 0)).await
                {
                    client.close().await;
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            false
        });
        if !up || self.child.try_wait().ok().flatten().is_some() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            self.kill();
            panic!("warden run did not come up within 30 s; its log:\n{log}");
        }
        self
    }

    /// Whether the log says the tree is up and the gateway takes sessions.
    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Sends SIGTERM (an ordered shutdown).
    fn terminate(&self) {
        let _ = Command::new("kill").args(["-TERM", &self.pid()]).status();
    }

    /// Waits up to 20 s for the process to end after [`WardenChild::terminate`]; then kills it.
    fn wait_exit(&mut self) {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        println!("warden run did not stop within 20 s of SIGTERM; killing it");
        self.kill();
    }

    /// SIGTERM, wait for the exit, remove the directory; how long the exit took.
    fn stop(mut self) -> Duration {
        let t = Instant::now();
        self.terminate();
        self.wait_exit();
        let _ = std::fs::remove_dir_all(&self.dir);
        t.elapsed()
    }

    /// Whether `/readyz?path=root/gateway` answers 200 (what a probe waits for).
    fn ready(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", self.admin_port)) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let asked =
            conn.write_all(b"GET /readyz?path=root/gateway HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        let mut text = String::new();
        // `HTTP/1.0 200 OK` (the answer has the request's version).
        asked.is_ok()
            && conn.read_to_string(&mut text).is_ok()
            && text
                .lines()
                .next()
                .is_some_and(|status| status.split(' ').nth(1) == Some("200"))
    }

    /// One gauge or counter from the admin endpoint's `/metrics` (summed over labels).
    fn metric(&self, name: &str) -> Option<f64> {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", self.admin_port)).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        conn.read_to_string(&mut text).ok()?;
        let values: Vec<f64> = text
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

/// Connect options for client `i`: nodes get a unique name.
fn options(role: Role, i: usize) -> ConnectOptions {
    let mut o = ConnectOptions::new(
        role,
        TOKEN,
        ClientInfo {
            name: "warden-bench".to_string(),
            version: "0".to_string(),
        },
    );
    if role == Role::Node {
        o.node = Some(NodeInfo {
            name: format!("node-{i}"),
            commands: vec!["uptime".into()],
        });
    }
    o
}

/// What a batch of handshakes gave.
struct Handshakes {
    ok: usize,
    wall: Duration,
    connect: Vec<Duration>,
    close: Vec<Duration>,
    busy: usize,
    errors: usize,
    first_error: Option<String>,
}

/// `total` handshakes, each followed by `close()`, by `concurrency` tasks.
async fn handshakes(url: &str, total: usize, concurrency: usize) -> Handshakes {
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let (next, url) = (next.clone(), url.to_string());
        tasks.spawn(async move {
            let mut connect = Vec::new();
            let mut close = Vec::new();
            let (mut busy, mut errors, mut first_error) = (0, 0, None);
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let t = Instant::now();
                match GatewayClient::connect(&url, options(Role::Operator, 0)).await {
                    Ok((client, _hello)) => {
                        connect.push(t.elapsed());
                        let t = Instant::now();
                        client.close().await;
                        close.push(t.elapsed());
                    }
                    Err(e) => {
                        if matches!(e, ConnectError::Busy { .. }) {
                            busy += 1;
                        } else {
                            errors += 1;
                        }
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            (connect, close, busy, errors, first_error)
        });
    }
    let mut out = Handshakes {
        ok: 0,
        wall: Duration::ZERO,
        connect: Vec::with_capacity(total),
        close: Vec::with_capacity(total),
        busy: 0,
        errors: 0,
        first_error: None,
    };
    while let Some(done) = tasks.join_next().await {
        let (connect, close, busy, errors, first_error) = done.expect("a client task ends");
        out.connect.extend(connect);
        out.close.extend(close);
        out.busy += busy;
        out.errors += errors;
        if out.first_error.is_none() {
            out.first_error = first_error;
        }
    }
    out.wall = t.elapsed();
    out.ok = out.connect.len();
    out
}

/// Opens `n` connections of `role`, `concurrency` handshakes at a time; keeps them.
async fn open_many(
    url: &str,
    n: usize,
    concurrency: usize,
    role: Role,
) -> (Vec<GatewayClient>, Duration, usize, Option<String>) {
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let (next, url) = (next.clone(), url.to_string());
        tasks.spawn(async move {
            let mut clients = Vec::new();
            let (mut errors, mut first_error) = (0, None);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                match GatewayClient::connect(&url, options(role, i)).await {
                    Ok((client, _)) => clients.push(client),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            (clients, errors, first_error)
        });
    }
    let (mut clients, mut errors, mut first_error) = (Vec::with_capacity(n), 0, None);
    while let Some(done) = tasks.join_next().await {
        let (c, e, f) = done.expect("a client task ends");
        clients.extend(c);
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    (clients, t.elapsed(), errors, first_error)
}

/// Closes every client, `concurrency` at a time.
async fn close_all(clients: Vec<GatewayClient>, concurrency: usize) -> Duration {
    let t = Instant::now();
    let queue = Arc::new(Mutex::new(clients));
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let queue = queue.clone();
        tasks.spawn(async move {
            loop {
                let client = queue.lock().unwrap_or_else(PoisonError::into_inner).pop();
                match client {
                    Some(client) => client.close().await,
                    None => break,
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    t.elapsed()
}

// ---------------------------------------------------------------------------------------
// 1. Handshake throughput and latency
// ---------------------------------------------------------------------------------------

/// Where the gateway of a handshake run is.
enum Target<'a> {
    InProcess(&'a InProcess),
    Child(&'a WardenChild),
}

fn handshake_run(
    report: &mut Report,
    target: &Target<'_>,
    client_rt: &Runtime,
    total: usize,
    concurrency: usize,
    warmup: usize,
) {
    let (bench, url) = match target {
        Target::InProcess(g) => ("handshake, in-process", g.url()),
        Target::Child(c) => ("handshake, warden run", c.url()),
    };
    client_rt.block_on(handshakes(&url, warmup, concurrency));

    // Peak of handshaking sockets, sampled every ms (in-process only: the state is here).
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = match target {
        Target::InProcess(g) => {
            let (stop, peak, state) = (stop.clone(), peak.clone(), g.state.clone());
            Some(client_rt.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(state.counts().3, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }))
        }
        Target::Child(_) => None,
    };
    let cpu_gw = || match target {
        Target::InProcess(_) => threads_cpu("gw-"),
        Target::Child(c) => process_cpu(c.child.id()),
    };
    let (gw0, cl0) = (cpu_gw(), threads_cpu("cl-"));
    let r = client_rt.block_on(handshakes(&url, total, concurrency));
    let (gw1, cl1) = (cpu_gw(), threads_cpu("cl-"));
    stop.store(true, Ordering::Relaxed);
    if let Some(s) = sampler {
        client_rt.block_on(s).expect("the sampler ends");
    }

    let rate = r.ok as f64 / r.wall.as_secs_f64();
    let (c, cl) = (Stats::of(&r.connect), Stats::of(&r.close));
    let gw_cpu_us = (gw1 - gw0).as_secs_f64() * 1e6 / r.ok.max(1) as f64;
    let cl_cpu_us = (cl1 - cl0).as_secs_f64() * 1e6 / r.ok.max(1) as f64;
    let peak = peak.load(Ordering::Relaxed);
    println!(
        "{bench}, concurrency {concurrency}: {} ok in {:.2} s = {rate:.0}/s; connect p50 {} p99 {} \
         max {}; close p50 {} p99 {}; CPU per handshake: gateway {gw_cpu_us:.0} µs, clients \
         {cl_cpu_us:.0} µs; 503s {}, other errors {}{}",
        r.ok,
        r.wall.as_secs_f64(),
        ms(c.p50),
        ms(c.p99),
        ms(c.max),
        ms(cl.p50),
        ms(cl.p99),
        r.busy,
        r.errors,
        r.first_error
            .as_deref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    let b = format!("{bench}, c={concurrency}");
    report.add(
        &b,
        &format!("handshake+close cycles/s (n={})", thousands(r.ok as u64)),
        format!("{rate:.0}/s"),
        "≥ 5,000/s",
        Some(rate >= 5_000.0),
    );
    report.add(
        &b,
        "connect p50 / p99 / max",
        format!("{} / {} / {}", ms(c.p50), ms(c.p99), ms(c.max)),
        "",
        None,
    );
    report.add(
        &b,
        "close p50 / p99",
        format!("{} / {}", ms(cl.p50), ms(cl.p99)),
        "",
        None,
    );
    report.add(
        &b,
        "CPU per handshake: gateway / clients",
        format!("{gw_cpu_us:.0} / {cl_cpu_us:.0} µs"),
        "",
        None,
    );
    if matches!(target, Target::InProcess(_)) {
        report.add(
            &b,
            "peak handshaking sockets (1 ms samples)",
            peak.to_string(),
            "",
            None,
        );
    }
    report.add(
        &b,
        "503s / other errors",
        format!("{} / {}", r.busy, r.errors),
        "0 / 0",
        Some(r.busy == 0 && r.errors == 0),
    );
}

fn bench_handshake(report: &mut Report, size: Size, gw_rt: &Runtime, client_rt: &Runtime) {
    println!("\n== handshake, gateway in this process ==");
    let total = size.pick(200, 5_000, 20_000);
    let gw = InProcess::start(gw_rt);
    for concurrency in size.pick(vec![4, 16], vec![16, 64, 256], vec![16, 64, 256]) {
        handshake_run(
            report,
            &Target::InProcess(&gw),
            client_rt,
            total,
            concurrency,
            total / 10,
        );
    }
    // Every session is gone again: none leaks.
    let sessions = gw.state.counts();
    println!("sessions left (operator, node, approver, handshaking): {sessions:?}");
    gw.stop(gw_rt);
}

fn bench_handshake_child(report: &mut Report, size: Size, client_rt: &Runtime) {
    println!("\n== handshake, gateway in a warden run child ==");
    let Some(bin) = warden_binary() else {
        println!("skipped: no warden binary beside the bench (cargo build --release --bin warden)");
        return;
    };
    println!("binary: {}", bin.display());
    let total = size.pick(200, 5_000, 20_000);
    let child = WardenChild::start(&bin, client_rt, "handshake", MAX_PREAUTH);
    for concurrency in size.pick(vec![16], vec![64], vec![16, 64, 256]) {
        handshake_run(
            report,
            &Target::Child(&child),
            client_rt,
            total,
            concurrency,
            total / 10,
        );
    }
    let stopped = child.stop();
    println!("SIGTERM → exit in {:.2} s", stopped.as_secs_f64());
}

// ---------------------------------------------------------------------------------------
// 2. Idle connections
// ---------------------------------------------------------------------------------------

fn bench_idle(report: &mut Report, size: Size, client_rt: &Runtime, role: Role) {
    let n = size.pick(50, 2_000, 10_000);
    let hold = Duration::from_millis(size.pick(300, 3_000, 10_000));
    let concurrency = 64;
    println!(
        "\n== {n} idle {} connections, gateway in a warden run child ==",
        role.as_str()
    );
    let Some(bin) = warden_binary() else {
        println!("skipped: no warden binary beside the bench (cargo build --release --bin warden)");
        return;
    };
    if !nofile_ok(n as u64 + 512) {
        report.add(
            "idle",
            "not run",
            "open-file limit too low".to_string(),
            "",
            None,
        );
        return;
    }
    let child = WardenChild::start(&bin, client_rt, role.as_str(), MAX_PREAUTH);
    let pid = child.pid();
    let url = child.url();
    // Let the start-up settle before the baseline.
    std::thread::sleep(Duration::from_millis(200));
    let base = status_kib(&pid, "VmRSS");
    let bench_base = status_kib("self", "VmRSS");
    let (clients, took, errors, first_error) =
        client_rt.block_on(open_many(&url, n, concurrency, role));
    let opened = clients.len();
    let after_open = status_kib(&pid, "VmRSS");
    println!(
        "{opened} connections in {:.2} s ({:.0}/s, concurrency {concurrency}), {errors} errors{}; \
         gateway RSS {:.1} → {:.1} MiB",
        took.as_secs_f64(),
        opened as f64 / took.as_secs_f64(),
        first_error
            .as_deref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        mib(base),
        mib(after_open)
    );

    // The gateway's own count, through one more operator session.
    let status = client_rt.block_on(async {
        let (mut c, _) = GatewayClient::connect(&url, options(Role::Operator, 0))
            .await
            .expect("an operator connects");
        let status = c.call("status", json!({})).await.expect("status answers");
        c.close().await;
        status
    });
    let sessions = status["sessions"][role.as_str()].as_u64().unwrap_or(0);
    println!("gateway status: {}", status["sessions"]);

    // Idle: sample the RSS every second.
    let t = Instant::now();
    let mut max_idle = after_open;
    while t.elapsed() < hold {
        std::thread::sleep(Duration::from_millis(250).min(hold));
        max_idle = max_idle.max(status_kib(&pid, "VmRSS"));
    }
    let after_idle = status_kib(&pid, "VmRSS");
    let hwm = status_kib(&pid, "VmHWM");
    let bench_rss = status_kib("self", "VmRSS");
    let per_conn = after_idle.saturating_sub(base) as f64 / opened.max(1) as f64;
    println!(
        "after {:.0} s idle: gateway RSS {:.1} MiB (max sampled {:.1}, VmHWM {:.1}); \
         {per_conn:.1} KiB per connection; bench process (clients) {:.1} → {:.1} MiB",
        hold.as_secs_f64(),
        mib(after_idle),
        mib(max_idle),
        mib(hwm),
        mib(bench_base),
        mib(bench_rss)
    );

    // Still alive and authenticated after the idle period: a sample answers `health`.
    let (alive, clients) = client_rt.block_on(async move {
        let mut clients = clients;
        let mut alive = 0;
        for c in clients.iter_mut().step_by((opened / 100).max(1)) {
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(5), c.call("health", json!({}))).await
            {
                alive += 1;
            }
        }
        (alive, clients)
    });
    let sampled = opened.div_ceil((opened / 100).max(1));
    let closed_in = client_rt.block_on(close_all(clients, 256));
    let stopped = child.stop();
    println!(
        "{alive} of {sampled} sampled connections answered health after the idle period; \
         closed all in {:.2} s; SIGTERM → exit in {:.2} s",
        closed_in.as_secs_f64(),
        stopped.as_secs_f64()
    );

    let b = format!("idle {} × {}", thousands(n as u64), role.as_str());
    report.add(
        &b,
        &format!("established (concurrency {concurrency})"),
        format!(
            "{} in {:.2} s ({:.0}/s), {errors} errors",
            thousands(opened as u64),
            took.as_secs_f64(),
            opened as f64 / took.as_secs_f64()
        ),
        "all",
        // The operator that asked for `status` counts too.
        Some(opened == n && sessions == (n + usize::from(role == Role::Operator)) as u64),
    );
    report.add(
        &b,
        &format!(
            "gateway RSS: start → open → after {:.0} s idle",
            hold.as_secs_f64()
        ),
        format!(
            "{:.1} → {:.1} → {:.1} MiB",
            mib(base),
            mib(after_open),
            mib(after_idle)
        ),
        "≤ 300 MiB",
        Some(max_idle <= 300 * 1024 && hwm <= 300 * 1024),
    );
    report.add(
        &b,
        "gateway VmHWM / per connection",
        format!("{:.1} MiB / {per_conn:.1} KiB", mib(hwm)),
        "",
        None,
    );
    report.add(
        &b,
        "sampled sessions answering health after idle",
        format!("{alive} of {sampled}"),
        "all",
        Some(alive == sampled),
    );
}

// ---------------------------------------------------------------------------------------
// 3. Reconnect convergence
// ---------------------------------------------------------------------------------------

/// Nodes the gateway lists as connected, asked through one operator session.
fn nodes_online(client_rt: &Runtime, url: &str) -> usize {
    client_rt.block_on(async {
        let Ok((mut c, _)) = GatewayClient::connect(url, options(Role::Operator, 0)).await else {
            return 0;
        };
        let list = c.call("nodes.list", json!({})).await.unwrap_or_default();
        c.close().await;
        list.as_array().map_or(0, |nodes| {
            nodes.iter().filter(|n| n["connected"] == true).count()
        })
    })
}

/// When each node lost its connection and got it back, polled every millisecond.
struct Offline {
    lost: Vec<Option<Instant>>,
    back: Vec<Option<Instant>>,
}

fn watch_nodes(statuses: &[Arc<NodeStatus>], give_up: Instant) -> Offline {
    let n = statuses.len();
    let mut out = Offline {
        lost: vec![None; n],
        back: vec![None; n],
    };
    let mut pending = n;
    while pending > 0 && Instant::now() < give_up {
        let now = Instant::now();
        for (i, status) in statuses.iter().enumerate() {
            if out.back[i].is_some() {
                continue;
            }
            let up = status.connected();
            match out.lost[i] {
                None if !up => out.lost[i] = Some(now),
                Some(_) if up => {
                    out.back[i] = Some(now);
                    pending -= 1;
                }
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    out
}

/// `budget`: the gateway's `max_preauth_per_ip`. Every node connects from 127.0.0.1, so
/// the default (32) is the budget of one NAT address holding every node; `MAX_PREAUTH`
/// stands in for nodes spread over many addresses.
fn bench_reconnect(
    report: &mut Report,
    client_rt: &Runtime,
    budget: u32,
    n: usize,
    pause: Duration,
) {
    println!(
        "\n== reconnect: {n} in-process nodes, max_preauth_per_ip {budget}; warden run SIGTERMed, \
         started again {:.1} s later (at once: as soon as it exited) ==",
        pause.as_secs_f64()
    );
    let Some(bin) = warden_binary() else {
        println!("skipped: no warden binary beside the bench (cargo build --release --bin warden)");
        return;
    };
    if !nofile_ok(n as u64 + 512) {
        report.add(
            "reconnect",
            "not run",
            "open-file limit too low".to_string(),
            "",
            None,
        );
        return;
    }
    let mut gw = WardenChild::start(&bin, client_rt, &format!("reconnect-{budget}"), budget);
    let statuses: Vec<Arc<NodeStatus>> = (0..n).map(|_| Arc::new(NodeStatus::new())).collect();
    let specs = statuses
        .iter()
        .enumerate()
        .map(|(i, status)| {
            let config = ConnectionConfig {
                gateway_url: gw.url(),
                token: TOKEN.to_string(),
                name: format!("node-{i}"),
                commands: Arc::new(BTreeMap::new()),
                handshake_timeout: Duration::from_secs(10),
                reconnect_window: Duration::from_secs(10),
                reconnect_within: Duration::from_millis(500),
            };
            let connection = connection::spec(config, status.clone(), connection::DEFAULT_POLICY);
            ChildSpec::supervisor(format!("n-{i}"), Strategy::OneForOne, vec![connection])
        })
        .collect();

    // Cold start: every node connects at once.
    let t = Instant::now();
    let tree = client_rt
        .block_on(Tree::start(specs, TreeOptions::default()))
        .expect("the node tree starts");
    let deadline = Instant::now() + Duration::from_secs(120);
    while statuses.iter().any(|s| !s.connected()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let cold = t.elapsed();
    let cold_rejected = gw
        .metric(gateway::metrics::PREAUTH_REJECTIONS_TOTAL)
        .unwrap_or(0.0);
    let listed = nodes_online(client_rt, &gw.url());
    println!(
        "cold start: {listed} of {n} nodes listed as connected after {:.2} s ({cold_rejected} \
         handshakes answered 503)",
        cold.as_secs_f64()
    );

    // The restart.
    let t_term = Instant::now();
    gw.terminate();
    let (offline, t_exit, t_spawn, t_ready, peak, samples, gw2) = std::thread::scope(|scope| {
        let give_up = t_term + Duration::from_secs(60);
        let statuses = &statuses;
        let watcher = scope.spawn(move || watch_nodes(statuses, give_up));
        gw.wait_exit();
        let t_exit = Instant::now();
        let restart_at = (t_term + pause).max(t_exit);
        std::thread::sleep(restart_at.saturating_duration_since(Instant::now()));
        let t_spawn = Instant::now();
        let gw2 = WardenChild::spawn(&bin, gw.dir.clone(), 2, gw.port, gw.admin_port);
        // Ready as a probe sees it: /readyz of the gateway answers 200.
        while !gw2.ready() && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(1));
        }
        let t_ready = Instant::now();
        // The handshaking gauge while the nodes come back (a sampled lower bound of the peak).
        let (mut peak, mut samples) = (0.0f64, 0u32);
        while !watcher.is_finished() {
            if let Some(v) = gw2.metric(gateway::metrics::HANDSHAKING) {
                peak = peak.max(v);
                samples += 1;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let offline = watcher.join().expect("the watcher ends");
        (offline, t_exit, t_spawn, t_ready, peak, samples, gw2)
    });
    let rejected = gw2
        .metric(gateway::metrics::PREAUTH_REJECTIONS_TOTAL)
        .unwrap_or(0.0);
    let listed = nodes_online(client_rt, &gw2.url());

    let since = |from: Instant, xs: &[Option<Instant>]| -> Vec<Duration> {
        xs.iter()
            .flatten()
            .map(|t| t.saturating_duration_since(from))
            .collect()
    };
    let came_back = offline.back.iter().flatten().count();
    let from_term = Stats::of(&since(t_term, &offline.back));
    let from_ready = Stats::of(&since(t_ready, &offline.back));
    let noticed = Stats::of(&since(t_term, &offline.lost));
    let own: Vec<Duration> = offline
        .lost
        .iter()
        .zip(&offline.back)
        .filter_map(|(l, b)| Some(b.as_ref()?.saturating_duration_since(*l.as_ref()?)))
        .collect();
    let own = Stats::of(&own);
    let downtime = t_ready - t_term;
    let secs = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    let s3 = |st: Stats| {
        format!(
            "{:.2} / {:.2} / {:.2} s",
            st.p50 / 1e6,
            st.p99 / 1e6,
            st.max / 1e6
        )
    };
    println!(
        "SIGTERM → exit {}, → new process {}, → new gateway ready {} (downtime)",
        secs(t_exit - t_term),
        secs(t_spawn - t_term),
        secs(downtime)
    );
    println!(
        "nodes saw the loss after p50/p99/max {}; back after SIGTERM {}; after the new gateway \
         was ready {}; own offline time {}; {came_back} of {n} back, {listed} listed",
        s3(noticed),
        s3(from_term),
        s3(from_ready),
        s3(own)
    );
    println!(
        "handshaking sockets while they came back: sampled peak {peak} over {samples} samples \
         (budget {budget} per IP); {rejected} handshakes answered 503"
    );

    let b = format!("reconnect {} nodes, preauth {budget}", thousands(n as u64));
    report.add(
        &b,
        "cold start: all connected",
        format!("{} ({cold_rejected} × 503)", secs(cold)),
        "",
        None,
    );
    report.add(
        &b,
        "SIGTERM → exit / → new gateway ready (downtime)",
        format!("{} / {}", secs(t_exit - t_term), secs(downtime)),
        "",
        None,
    );
    report.add(
        &b,
        "offline from SIGTERM p50 / p99 / max",
        s3(from_term),
        &format!(
            "p99 ≤ downtime + 1 s = {}",
            secs(downtime + Duration::from_secs(1))
        ),
        Some(came_back == n && from_term.p99 <= (downtime.as_secs_f64() + 1.0) * 1e6),
    );
    // Restarted at once, within the gateway's announced `expected_back_ms`: the nodes must
    // be back right after it is ready (issue 14), with no handshake refused or timed out.
    let immediate = pause.is_zero();
    let timeouts = gw2
        .metric(gateway::metrics::HANDSHAKE_TIMEOUTS_TOTAL)
        .unwrap_or(0.0);
    let ms3 = |st: Stats| {
        format!(
            "{:.0} / {:.0} / {:.0} ms",
            st.p50 / 1e3,
            st.p99 / 1e3,
            st.max / 1e3
        )
    };
    report.add(
        &b,
        "back after gateway /readyz p50 / p99 / max",
        ms3(from_ready),
        if immediate { "p99 ≤ 250 ms" } else { "" },
        immediate.then_some(came_back == n && from_ready.p99 <= 250e3),
    );
    report.add(
        &b,
        "handshake timeouts (4408) / 503s after the restart",
        format!("{timeouts} / {rejected}"),
        if immediate { "0 / 0" } else { "" },
        immediate.then_some(timeouts == 0.0 && rejected == 0.0),
    );
    report.add(
        &b,
        "nodes back / listed by nodes.list",
        format!("{came_back} / {listed} of {n}"),
        "all",
        Some(came_back == n && listed == n),
    );
    report.add(
        &b,
        "handshaking peak (sampled) / 503s",
        format!("{peak} ({samples} samples) / {rejected}"),
        &format!("≤ {budget}"),
        Some(peak <= f64::from(budget)),
    );

    client_rt.block_on(async {
        let _ = tree.shutdown(Duration::from_secs(30)).await;
    });
    let _ = gw2.stop();
}

// ---------------------------------------------------------------------------------------

fn main() {
    // `cargo bench` passes `--bench`; `cargo test` does not, and gets a smoke run. Words
    // select sections (handshake, handshake-child, idle) and a size (smoke, quick, full).
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
    let sections: Vec<&str> = words
        .iter()
        .copied()
        .filter(|w| !["smoke", "quick", "full"].contains(w))
        .collect();
    let want = |s: &str| sections.is_empty() || sections.contains(&s);

    let runtime = |name: &'static str| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(name)
            .enable_all()
            .build()
            .expect("a tokio runtime starts")
    };
    let gw_rt = runtime("gw-worker");
    let client_rt = runtime("cl-worker");
    let mut report = Report {
        no_verdicts: size == Size::Smoke,
        ..Report::default()
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at start: {}", load.trim());
    if size == Size::Smoke {
        println!("smoke run (toy sizes): use `cargo bench` for figures");
    }
    if want("idle") && !ensure_nofile(size.pick(50, 2_000, 10_000) + 512) {
        println!("the idle section will not run");
    }
    if want("handshake") {
        bench_handshake(&mut report, size, &gw_rt, &client_rt);
    }
    if want("handshake-child") {
        bench_handshake_child(&mut report, size, &client_rt);
    }
    if want("idle") {
        bench_idle(&mut report, size, &client_rt, Role::Operator);
        bench_idle(&mut report, size, &client_rt, Role::Node);
    }
    if want("inbox-append") {
        inbox::bench_append(&mut report, size, &gw_rt);
    }
    if want("inbox-replay") {
        inbox::bench_replay(&mut report, size, &gw_rt, &client_rt);
    }
    if want("inbox-latency") {
        inbox::bench_latency(&mut report, size, &gw_rt, &client_rt);
    }
    let default_budget = GatewaySettings::default().max_preauth_per_ip;
    if want("reconnect") {
        let n = size.pick(20, 200, 1_000);
        let pause = Duration::from_millis(size.pick(200, 2_000, 2_000));
        bench_reconnect(&mut report, &client_rt, default_budget, n, pause);
        bench_reconnect(&mut report, &client_rt, MAX_PREAUTH, n, pause);
    }
    if want("node-return") {
        // Issue 14: 100 node hosts, the gateway SIGTERMed and started again at once.
        let n = size.pick(20, 100, 100);
        bench_reconnect(&mut report, &client_rt, default_budget, n, Duration::ZERO);
    }
    report.print();
}
