//! A TCP fault proxy for tests: forwards to an upstream and, on command, resets every
//! connection (SO_LINGER 0, so peers see ECONNRESET), refuses new ones (the listener is
//! closed, so connects see ECONNREFUSED), or stalls them (accepted, never forwarded).
//!
//! It stands between warden and a server it talks to (Synapse, a gateway) to produce the
//! failures the tests are about, on real sockets. No packaged fault proxy is available from
//! the registries this project can reach, so it is written here. It also records the
//! request line of every HTTP request it forwards, so a test can count e.g. `whoami` calls,
//! and when each was in flight, so a test can bound how many `login`s ran at once.
//!
//! Commands are acknowledged: [`FaultProxy::set_mode`] returns once the proxy's task has
//! applied the mode (the listener closed or bound again), and [`FaultProxy::reset_all`]
//! once every connection it reset is gone, so a test never sleeps to let them take effect.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

use crate::support::eventually;

/// What the proxy does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Forward,
    /// Close the listener: new connects are refused. Open connections stay.
    Refuse,
    /// Accept new connections but never forward a byte on them.
    Stall,
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    /// The mode last set: whether the task has a listener.
    mode: Mutex<Mode>,
    /// Commands to the proxy's task, each acknowledged once done.
    commands: mpsc::Sender<Command>,
    reset: broadcast::Sender<()>,
    shared: Arc<Shared>,
    /// The accept loop, which owns the connections' tasks; aborted on drop.
    task: JoinHandle<()>,
}

/// What the proxy's task is asked to do.
enum Command {
    /// Switch to a mode, listening again on the listener given (bound by the caller, when
    /// the task has none); acknowledged once new connections meet the mode.
    Mode(Mode, Option<TcpListener>, oneshot::Sender<()>),
    /// Reset every open connection; acknowledged, with how many there were, once they
    /// are gone.
    Reset(oneshot::Sender<usize>),
}

#[derive(Default)]
struct Shared {
    accepted: AtomicUsize,
    active: AtomicUsize,
    requests: Mutex<Vec<String>>,
    flights: Mutex<Flights>,
}

/// Every HTTP request forwarded, with when it was in flight: from its request line passing
/// the proxy to the first bytes of an answer on its connection (or the connection's end).
/// Times are steps of one counter, so that starts and ends are totally ordered.
#[derive(Default)]
struct Flights {
    clock: u64,
    all: Vec<Flight>,
}

struct Flight {
    connection: usize,
    line: String,
    start: u64,
    end: Option<u64>,
}

impl Flights {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The answer to the oldest open request of `connection` has begun. HTTP/1.1 without
    /// pipelining (what reqwest does) has one request at a time per connection, so the
    /// following bytes of the same answer find no open request.
    fn answered(&mut self, connection: usize) {
        let now = self.tick();
        if let Some(f) = self
            .all
            .iter_mut()
            .find(|f| f.connection == connection && f.end.is_none())
        {
            f.end = Some(now);
        }
    }

    /// `connection` is gone: none of its requests is in flight any more.
    fn closed(&mut self, connection: usize) {
        let now = self.tick();
        for f in self
            .all
            .iter_mut()
            .filter(|f| f.connection == connection && f.end.is_none())
        {
            f.end = Some(now);
        }
    }
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (commands, commands_rx) = mpsc::channel(4);
        let (reset, _) = broadcast::channel(16);
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(accept_loop(
            listener,
            upstream,
            commands_rx,
            reset.clone(),
            shared.clone(),
        ));
        Ok(FaultProxy {
            addr,
            mode: Mutex::new(Mode::Forward),
            commands,
            reset,
            shared,
            task,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://` and where clients connect: the homeserver URL of a proxied Synapse.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Switches what happens to new connections; returns once every connection accepted
    /// from now on meets `mode` (for [`Mode::Refuse`], once the listener is closed).
    pub async fn set_mode(&self, mode: Mode) {
        let previous = std::mem::replace(&mut *self.mode.lock().expect("mode"), mode);
        let listener = if previous == Mode::Refuse && mode != Mode::Refuse {
            // The port may be busy for a moment after the listener closed.
            let what = format!("{} free to listen on again", self.addr);
            let bind = async || TcpListener::bind(self.addr).await;
            Some(eventually(Duration::from_secs(5), what, bind).await)
        } else {
            None
        };
        let (done, applied) = oneshot::channel();
        self.command(Command::Mode(mode, listener, done)).await;
        applied.await.expect("the proxy applies the mode");
    }

    /// Resets every open connection (both sides see a reset); returns how many there were,
    /// once they are gone. Connections made meanwhile are not reset.
    pub async fn reset_all(&self) -> usize {
        let (done, gone) = oneshot::channel();
        self.command(Command::Reset(done)).await;
        gone.await.expect("the proxy resets its connections")
    }

    async fn command(&self, command: Command) {
        self.commands
            .send(command)
            .await
            .unwrap_or_else(|_| panic!("the proxy's task has ended"));
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// The request lines (`POST /_matrix/client/v3/login HTTP/1.1`) forwarded so far.
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().expect("requests").clone()
    }

    /// How many requests whose request line contains `pattern` (e.g. `"/login"`) were
    /// forwarded so far.
    pub fn count(&self, pattern: &str) -> usize {
        self.shared
            .requests
            .lock()
            .expect("requests")
            .iter()
            .filter(|line| line.contains(pattern))
            .count()
    }

    /// How many requests whose request line contains `pattern` are in flight now: forwarded,
    /// and no answer has begun on their connection yet.
    pub fn in_flight(&self, pattern: &str) -> usize {
        let flights = self.shared.flights.lock().expect("flights");
        flights
            .all
            .iter()
            .filter(|f| f.end.is_none() && f.line.contains(pattern))
            .count()
    }

    /// The most requests whose request line contains `pattern` that were ever in flight at
    /// the same time, since the proxy started. A request is in flight from when its request
    /// line passes the proxy until the first bytes of an answer come back on its connection
    /// (or the connection ends). Counts HTTP/1.1 as reqwest speaks it: one request at a
    /// time per connection (no pipelining).
    pub fn peak_in_flight(&self, pattern: &str) -> usize {
        let flights = self.shared.flights.lock().expect("flights");
        // Every start and end is a distinct tick, so sorting them replays the history.
        let mut steps: Vec<(u64, isize)> = Vec::new();
        for f in flights.all.iter().filter(|f| f.line.contains(pattern)) {
            steps.push((f.start, 1));
            if let Some(end) = f.end {
                steps.push((end, -1));
            }
        }
        steps.sort_unstable();
        let (mut now, mut peak) = (0isize, 0isize);
        for (_, step) in steps {
            now += step;
            peak = peak.max(now);
        }
        usize::try_from(peak).unwrap_or(0)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.reset.send(());
        self.task.abort();
    }
}

/// Accepts connections as the mode says and forwards each in a task of its own, until the
/// proxy is dropped; carries out the commands in between.
async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mut commands: mpsc::Receiver<Command>,
    reset: broadcast::Sender<()>,
    shared: Arc<Shared>,
) {
    let mut listener = Some(listener);
    let mut mode = Mode::Forward;
    let mut connections = JoinSet::new();
    loop {
        let accepted = async {
            match &listener {
                Some(l) => l.accept().await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            command = commands.recv() => match command {
                Some(Command::Mode(next, bound, done)) => {
                    mode = next;
                    if mode == Mode::Refuse {
                        listener = None;
                    } else if bound.is_some() {
                        listener = bound;
                    }
                    let _ = done.send(());
                }
                Some(Command::Reset(done)) => {
                    let open = shared.active.load(Ordering::SeqCst);
                    let _ = reset.send(());
                    // Each connection ends at the reset: wait for all of them.
                    while connections.join_next().await.is_some() {}
                    let _ = done.send(open);
                }
                None => return,
            },
            accepted = accepted => {
                let Some((client, _)) = accepted else { continue };
                let id = shared.accepted.fetch_add(1, Ordering::SeqCst);
                shared.active.fetch_add(1, Ordering::SeqCst);
                let (shared, reset) = (shared.clone(), reset.subscribe());
                let stall = mode == Mode::Stall;
                connections.spawn(async move {
                    connection(client, upstream, stall, reset, id, &shared).await;
                    shared.flights.lock().expect("flights").closed(id);
                    shared.active.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Forwards one connection (number `id`) until either side closes or a reset is ordered.
async fn connection(
    mut client: TcpStream,
    upstream: SocketAddr,
    stall: bool,
    mut reset: broadcast::Receiver<()>,
    id: usize,
    shared: &Shared,
) {
    if stall {
        let _ = reset.recv().await;
        let _ = client.set_zero_linger();
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        let _ = client.set_zero_linger();
        return;
    };
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let to_server = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            record_requests(&buf[..n], id, shared);
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = sw.shutdown().await;
    };
    let to_client = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            shared.flights.lock().expect("flights").answered(id);
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    };
    tokio::select! {
        _ = async { tokio::join!(to_server, to_client) } => {}
        _ = reset.recv() => {
            let _ = client.set_zero_linger();
            let _ = server.set_zero_linger();
        }
    }
}

/// Notes every HTTP request line that starts in this chunk from connection `id`, as
/// forwarded and in flight (good enough for tests: request heads are small and arrive whole
/// on loopback).
fn record_requests(chunk: &[u8], id: usize, shared: &Shared) {
    const METHODS: [&str; 5] = ["GET ", "POST ", "PUT ", "DELETE ", "PATCH "];
    let text = String::from_utf8_lossy(chunk);
    let mut requests = shared.requests.lock().expect("requests");
    let mut flights = shared.flights.lock().expect("flights");
    for line in text.split("\r\n") {
        if METHODS.iter().any(|m| line.starts_with(m)) && line.ends_with("HTTP/1.1") {
            requests.push(line.to_string());
            let start = flights.tick();
            flights.all.push(Flight {
                connection: id,
                line: line.to_string(),
                start,
                end: None,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::watch;

    use super::*;

    /// An echo server that answers each line, counting its connections.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).await?;
        Ok(buf)
    }

    #[tokio::test]
    async fn forwards_then_resets_refuses_and_stalls() {
        let proxy = FaultProxy::start(echo_server().await).await.expect("proxy");
        let mut a = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert_eq!(
            round_trip(&mut a, b"GET /x HTTP/1.1\r\n\r\n")
                .await
                .expect("echo"),
            b"GET /x HTTP/1.1\r\n\r\n"
        );
        assert_eq!(proxy.requests(), ["GET /x HTTP/1.1"]);

        // Reset: the client's next read fails with ECONNRESET.
        assert_eq!(proxy.reset_all().await, 1);
        assert_eq!(proxy.active(), 0, "the reset connection is gone");
        let mut buf = [0u8; 8];
        let err = a.read(&mut buf).await.expect_err("reset");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");

        // Refuse: connects fail with ECONNREFUSED until forwarding resumes.
        proxy.set_mode(Mode::Refuse).await;
        let refused = TcpStream::connect(proxy.addr())
            .await
            .expect_err("still accepting");
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        proxy.set_mode(Mode::Forward).await;
        let mut b = TcpStream::connect(proxy.addr())
            .await
            .expect("accepting again");
        assert_eq!(round_trip(&mut b, b"ping").await.expect("echo"), b"ping");

        // Stall: accepted, but nothing comes back.
        proxy.set_mode(Mode::Stall).await;
        let mut c = TcpStream::connect(proxy.addr()).await.expect("accepted");
        let stalled =
            tokio::time::timeout(Duration::from_millis(300), round_trip(&mut c, b"ping")).await;
        assert!(stalled.is_err(), "a stalled connection answered");
        // The forwarded connection from before still works.
        assert_eq!(round_trip(&mut b, b"pong").await.expect("echo"), b"pong");
        assert!(proxy.accepted() >= 3);
    }

    /// An HTTP/1.1 server: `/fast` answers at once, `/slow` once `release` holds `true`.
    async fn http_server(release: watch::Receiver<bool>) -> SocketAddr {
        let slow = move || {
            let mut release = release.clone();
            async move {
                let _ = release.wait_for(|go| *go).await;
                "slow"
            }
        };
        let app = axum::Router::new()
            .route("/fast", axum::routing::get(|| async { "fast" }))
            .route("/slow", axum::routing::get(slow));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    const WITHIN: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn counts_requests_in_flight() {
        let (release, released) = watch::channel(false);
        let proxy = FaultProxy::start(http_server(released).await)
            .await
            .expect("proxy");
        let base = format!("http://{}", proxy.addr());
        let client = reqwest::Client::new();
        let get = |path: &'static str| {
            let (client, url) = (client.clone(), format!("{base}{path}"));
            async move {
                let reply = client.get(url).send().await?.error_for_status()?;
                reply.text().await
            }
        };

        // One after the other on one kept-alive connection: never two in flight.
        for _ in 0..3 {
            assert_eq!(get("/fast").await.expect("fast"), "fast");
        }
        assert_eq!(proxy.accepted(), 1, "the connection was kept alive");
        assert_eq!(proxy.count("/fast"), 3);
        assert_eq!(proxy.in_flight("/fast"), 0);
        assert_eq!(proxy.peak_in_flight("/fast"), 1);

        // Three at once, held by the server: three in flight until they are answered.
        let slow: Vec<_> = (0..3).map(|_| tokio::spawn(get("/slow"))).collect();
        eventually(WITHIN, "3 /slow in flight", async || {
            proxy.in_flight("/slow") == 3
        })
        .await;
        // Another path in between counts apart.
        assert_eq!(get("/fast").await.expect("fast"), "fast");
        assert_eq!(proxy.in_flight("/fast"), 0);
        assert_eq!(proxy.peak_in_flight("/fast"), 1);
        assert_eq!(
            proxy.in_flight("/"),
            3,
            "a pattern matches any part of the line"
        );
        release.send_replace(true);
        for task in slow {
            assert_eq!(task.await.expect("join").expect("slow"), "slow");
        }
        assert_eq!(proxy.in_flight("/slow"), 0);
        assert_eq!(proxy.peak_in_flight("/slow"), 3);
        assert_eq!(
            proxy.peak_in_flight("/"),
            4,
            "with the /fast among the /slow"
        );
        assert_eq!(proxy.peak_in_flight("/login"), 0);
        assert_eq!(proxy.count("/slow"), 3);

        // A request whose connection is reset is no longer in flight.
        release.send_replace(false);
        let held = tokio::spawn(get("/slow"));
        eventually(WITHIN, "1 /slow in flight", async || {
            proxy.in_flight("/slow") == 1
        })
        .await;
        proxy.reset_all().await;
        assert_eq!(proxy.in_flight("/slow"), 0);
        assert!(held.await.expect("join").is_err(), "a reset request failed");
        assert_eq!(proxy.peak_in_flight("/slow"), 3);
    }
}
