//! An HTTP server as a supervised actor: binds, accepts connections, serves an axum router
//! over HTTP/1.1, fails if serving ends.
//!
//! ## Connections
//! The accept loop is ours, not `axum::serve`'s, for what that one lacks:
//! * **A header read timeout** ([`ServeLimits::header_read_timeout`]): a connection that
//!   has not sent a whole request head within it is closed — the first request's head,
//!   counted from accept, and on a kept-alive connection the next one's, counted from the
//!   end of the previous exchange (hyper's `header_read_timeout`, on tokio's clock). A
//!   connection trickling one byte a second is closed on time.
//! * **A cap on open connections** ([`ServeLimits::max_connections`]), counted from accept
//!   to close; a connection upgraded to a WebSocket counts until the socket closes (the
//!   count travels inside the upgraded socket). Past the cap a new connection is answered
//!   a fixed `HTTP/1.1 503` with `Retry-After: 1` and a JSON error naming the cap, without
//!   reading its request, and closed.
//! * **Keep-alive, or not** ([`ServeLimits::keep_alive`]): without it a connection is
//!   closed after its first answer (or handed on by its upgrade), so one that does not
//!   upgrade holds its place at most one header read timeout plus one request — a client
//!   cannot keep a place by repeating cheap requests.
//! * **Per-connection values, or a refusal** ([`ServeArgs::on_accept`]): what the hook
//!   returns for a connection is added to the extensions of each of its requests and
//!   lives as long as the connection (the gateway's pre-auth slot); a [`Refusal`] instead
//!   gets the connection the same fixed 503 as the cap, with the hook's error, unread.
//!
//! Handlers still extract `ConnectInfo<SocketAddr>`. Only HTTP/1.1 is served (with
//! upgrades); there is no h2c.
//!
//! ## Messages
//! `Tick` — periodic: the caller's upkeep hook, a heartbeat, and a check that the server
//! task still runs. `Ended` — the server task finished without being asked to (normally,
//! with an error, or by a panic: a drop guard reports it while unwinding).
//!
//! ## Supervision
//! A leaf; the gateway listener and the admin endpoint are both one. The server task is
//! owned by the actor's state and owns one task per connection (a `JoinSet`). `post_stop`
//! stops accepting at once (freeing the port), closes every connection that has no request
//! in flight (idle, or still without a whole request head), lets the others finish theirs,
//! and gives them [`DRAIN`] before aborting them; a kill drops
//! the state, which aborts the server task and with it every connection task, so an old
//! incarnation never keeps the port. Upgraded sockets are no longer the server's: they
//! belong to whoever took the upgrade and outlive a stop.
//!
//! ## Restart policy
//! A bind failure fails the start as transient (the address may be freed later; the
//! child's budget and `on_exhausted` decide how long to keep trying). The server ending on
//! its own is a transient failure.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Extensions, HeaderValue, Request, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SpawnErr};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::task::{JoinError, JoinSet};
use tower_service::Service;
use tracing::{Instrument, debug, info, warn};

use crate::supervision::{ChildContext, Failure, Probe};
use crate::task::{self, AbortOnDrop};

/// How long `post_stop` lets in-flight requests finish before aborting them.
pub const DRAIN: Duration = Duration::from_secs(2);

/// How often the actor ticks (upkeep hook, heartbeat, server check).
pub const TICK: Duration = Duration::from_secs(5);

/// Something to run on every tick (e.g. metrics upkeep).
pub type TickHook = Arc<dyn Fn() + Send + Sync>;

/// Called for every accepted connection with its peer address, before the cap is checked
/// and before anything is read. The values it returns are added to the extensions of each
/// request on that connection, and dropped when the connection closes (for an upgraded
/// connection: when the upgraded socket is dropped). A [`Refusal`] has the connection
/// answered 503 with `Retry-After: 1` and closed unread. Must be cheap: it runs on the
/// accept loop.
pub type AcceptHook = Arc<dyn Fn(SocketAddr) -> Result<Extensions, Refusal> + Send + Sync>;

/// Why an [`AcceptHook`] turns a connection away: the JSON error of its 503.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The error code (`too_many_connections_from_address`).
    pub code: &'static str,
    /// A sentence for the client, naming the limit.
    pub message: String,
}

/// How long a connection past the cap may take to read its 503 before it is closed.
pub const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Connections past the cap that may linger at once to read their 503; further ones get
/// the answer written without waiting and are closed at once.
pub const MAX_LINGERING_REFUSALS: usize = 64;

/// The listen backlog: connections the kernel completes before the accept loop takes them.
/// The standard library's 128 overflows when a few hundred clients reconnect at once (a
/// restart), and the overflow costs each of them a 1 s SYN retransmission. The kernel caps
/// it at `net.core.somaxconn`.
pub const BACKLOG: u32 = 1024;

/// How long the accept loop pauses after an error that is not about one connection (e.g.
/// out of file descriptors), so it does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// What a server admits and for how long it waits.
#[derive(Debug, Clone)]
pub struct ServeLimits {
    /// A connection that has not sent a whole request head within this long (from accept,
    /// or from the end of its previous exchange) is closed.
    pub header_read_timeout: Duration,
    /// Open connections at most, from accept to close (upgraded ones included); `None`:
    /// no cap.
    pub max_connections: Option<usize>,
    /// Whether a connection may send another request after its first answer; if not, it
    /// is closed after that answer (`Connection: close`).
    pub keep_alive: bool,
    /// Where to record connections, if anywhere.
    pub metrics: Option<ServeMetrics>,
}

/// The metric names a server records under.
#[derive(Debug, Clone, Copy)]
pub struct ServeMetrics {
    /// Gauge: open connections.
    pub open: &'static str,
    /// Counter: connections answered 503 because the cap was reached.
    pub refused: &'static str,
}

/// What a server actor needs.
#[derive(Clone)]
pub struct ServeArgs {
    /// What it serves, for logs (`gateway`, `admin`).
    pub name: &'static str,
    /// Where to bind (port 0 picks a free port).
    pub bind: SocketAddr,
    /// The routes.
    pub router: Router,
    /// Receives the bound address on each start, and `None` when that incarnation stops.
    pub bound: Arc<watch::Sender<Option<SocketAddr>>>,
    /// Run on every tick.
    pub on_tick: Option<TickHook>,
    /// The header read timeout and the connection cap.
    pub limits: ServeLimits,
    /// Per-connection values for the requests of each admitted connection.
    pub on_accept: Option<AcceptHook>,
}

/// Messages of [`ServeActor`].
#[derive(Debug)]
pub enum ServeMsg {
    /// Periodic upkeep, heartbeat and server check.
    Tick,
    /// The server task ended on its own.
    Ended(String),
}

/// The server actor.
pub struct ServeActor;

/// One incarnation's arguments.
pub struct ServeStart {
    args: ServeArgs,
    path: String,
    probe: Probe,
    span: tracing::Span,
}

/// A running server: its task and how to stop it.
pub struct ServeState {
    name: &'static str,
    path: String,
    addr: SocketAddr,
    probe: Probe,
    on_tick: Option<TickHook>,
    bound: Arc<watch::Sender<Option<SocketAddr>>>,
    /// Asks the server to stop accepting and drain; taken when used.
    drain: Option<oneshot::Sender<()>>,
    /// The server task; taken when joined in `post_stop`, aborted on drop (a kill).
    task: Option<AbortOnDrop>,
    /// The upkeep interval; cancelled with the state.
    ticker: AbortOnDrop,
}

impl ServeActor {
    /// Spawns a server linked to the context's supervisor (for use in a start function).
    pub async fn start(ctx: ChildContext, args: ServeArgs) -> Result<ActorCell, SpawnErr> {
        let start = ServeStart {
            args,
            path: ctx.path.clone(),
            probe: ctx.probe.clone(),
            span: ctx.span(),
        };
        let (actor, _) =
            Actor::spawn_linked(None, ServeActor, start, ctx.supervisor.clone()).await?;
        Ok(actor.get_cell())
    }
}

/// Tells the actor when the server task of endpoint `name` ends on its own: it stopped
/// serving (with an error), or it panicked. An abort by the actor itself is not reported.
fn end_report(actor: ActorRef<ServeMsg>, name: &'static str) -> impl FnOnce(task::Ended) + Send {
    move |ended| {
        let reason = if ended.panicked() {
            "the server task panicked".to_string()
        } else {
            format!("the {name} server stopped serving")
        };
        let _ = actor.send_message(ServeMsg::Ended(reason));
    }
}

impl Actor for ServeActor {
    type Msg = ServeMsg;
    type State = ServeState;
    type Arguments = ServeStart;

    async fn pre_start(
        &self,
        myself: ActorRef<ServeMsg>,
        start: ServeStart,
    ) -> Result<ServeState, ActorProcessingErr> {
        let ServeStart {
            args,
            path,
            probe,
            span,
        } = start;
        let name = args.name;
        // `?` boxes a `Failure` once, so the supervisor reads its class back.
        let listener = bind(args.bind).map_err(|e| {
            Failure::transient(format!(
                "cannot bind the {name} endpoint on {}: {e}",
                args.bind
            ))
        })?;
        let addr = listener.local_addr().map_err(|e| {
            Failure::transient(format!("cannot read the {name} endpoint's address: {e}"))
        })?;
        let (drain, drained) = oneshot::channel::<()>();
        let server = Server::new(name, args.router, args.limits, args.on_accept);
        let report = end_report(myself.clone(), name);
        let task = task::spawn(
            "server",
            span.clone(),
            server.run(listener, drained),
            report,
        );
        let ticker = myself.send_interval(TICK, || ServeMsg::Tick).into();
        span.in_scope(|| info!(addr = %addr, "{} endpoint listening.", capitalise(name)));
        args.bound.send_replace(Some(addr));
        Ok(ServeState {
            name,
            path,
            addr,
            probe,
            on_tick: args.on_tick,
            bound: args.bound,
            drain: Some(drain),
            task: Some(task),
            ticker,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ServeMsg>,
        msg: ServeMsg,
        state: &mut ServeState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ServeMsg::Tick => {
                if state.task.as_ref().is_some_and(|t| t.is_finished()) {
                    return Err(Box::new(Failure::transient(format!(
                        "the {} server task ended",
                        state.name
                    ))));
                }
                if let Some(hook) = &state.on_tick {
                    hook();
                }
                state.probe.beat();
                Ok(())
            }
            ServeMsg::Ended(reason) => {
                warn!(actor = %state.path, addr = %state.addr, reason = %reason, "Server stopped serving.");
                Err(Box::new(Failure::transient(reason)))
            }
        }
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ServeMsg>,
        state: &mut ServeState,
    ) -> Result<(), ActorProcessingErr> {
        state.ticker.abort();
        if let Some(drain) = state.drain.take() {
            let _ = drain.send(());
        }
        if let Some(mut task) = state.task.take()
            && tokio::time::timeout(DRAIN, &mut task).await.is_err()
        {
            let timeout_ms = DRAIN.as_millis() as u64;
            warn!(actor = %state.path, timeout_ms, "Requests did not finish in time; aborting them.");
            task.abort();
            let _ = task.await;
        }
        state.unpublish();
        info!(actor = %state.path, addr = %state.addr, "{} endpoint stopped.", capitalise(state.name));
        Ok(())
    }
}

impl ServeState {
    /// Stops publishing our address, unless a later incarnation already published its own.
    fn unpublish(&self) {
        let mine = Some(self.addr);
        self.bound.send_if_modified(|current| {
            let ours = *current == mine;
            if ours {
                *current = None;
            }
            ours
        });
    }
}

impl Drop for ServeState {
    /// A killed actor skips `post_stop`; its dropped state must not leave its address
    /// published (its tasks end with their [`AbortOnDrop`]s).
    fn drop(&mut self) {
        self.unpublish();
    }
}

/// The accept loop and what every connection shares.
struct Server {
    name: &'static str,
    router: Router,
    /// Configured once: HTTP/1.1 with the header read timeout on tokio's clock.
    http: http1::Builder,
    /// Whether a connection may send another request after an answer.
    keep_alive: bool,
    /// One permit per open connection, when there is a cap.
    permits: Option<Arc<Semaphore>>,
    max_connections: Option<usize>,
    /// The whole answer to a connection past the cap.
    refusal: Arc<str>,
    metrics: Option<ServeMetrics>,
    on_accept: Option<AcceptHook>,
    /// Set when the cap was reached, cleared when a connection is admitted again: the
    /// warning is logged once per episode, not once per refused connection.
    full: bool,
}

impl Server {
    fn new(
        name: &'static str,
        router: Router,
        limits: ServeLimits,
        on_accept: Option<AcceptHook>,
    ) -> Self {
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout);
        Self {
            name,
            router,
            http,
            keep_alive: limits.keep_alive,
            permits: limits.max_connections.map(|n| Arc::new(Semaphore::new(n))),
            max_connections: limits.max_connections,
            refusal: over_capacity_answer(name, limits.max_connections.unwrap_or_default()).into(),
            metrics: limits.metrics,
            on_accept,
            full: false,
        }
    }

    /// Accepts until `stop` fires (or its sender is dropped), then stops accepting (the
    /// listener is dropped: the port is free), drops the refused connections, closes every
    /// connection with no request in flight, and returns when the others have answered
    /// theirs.
    async fn run(mut self, listener: TcpListener, mut stop: oneshot::Receiver<()>) {
        let (closing, closing_rx) = watch::channel(false);
        let mut conns = JoinSet::new();
        // Connections past the cap reading their 503; not waited for at a stop.
        let mut refusals = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                _ = &mut stop => break,
                Some(joined) = conns.join_next(), if !conns.is_empty() => self.reap(joined),
                Some(joined) = refusals.join_next(), if !refusals.is_empty() => self.reap(joined),
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        if let Some((stream, answer)) =
                            self.admit(stream, peer, &closing_rx, &mut conns)
                        {
                            refuse(stream, peer, answer, &mut refusals);
                        }
                    }
                    Err(e) if is_connection_error(&e) => {
                        debug!(error = %e, "A connection failed before it was accepted.");
                    }
                    Err(e) => {
                        warn!(error = %e, pause_ms = ACCEPT_ERROR_PAUSE.as_millis() as u64,
                            "Cannot accept connections; pausing.");
                        tokio::select! {
                            _ = &mut stop => break,
                            () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                        }
                    }
                },
            }
        }
        drop(listener);
        refusals.abort_all();
        let _ = closing.send(true);
        while let Some(joined) = conns.join_next().await {
            self.reap(joined);
        }
    }

    /// Serves a new connection in a task of `conns`; gives it back with the answer it gets
    /// instead when the hook refuses it or the cap is reached.
    fn admit(
        &mut self,
        stream: TcpStream,
        peer: SocketAddr,
        closing: &watch::Receiver<bool>,
        conns: &mut JoinSet<()>,
    ) -> Option<(TcpStream, Arc<str>)> {
        let values = match self.on_accept.as_ref().map(|hook| hook(peer)) {
            None => Extensions::new(),
            Some(Ok(values)) => values,
            Some(Err(refusal)) => {
                debug!(peer = %peer, code = refusal.code, message = %refusal.message,
                    "Refused a connection at accept.");
                return Some((
                    stream,
                    refusal_answer(refusal.code, &refusal.message).into(),
                ));
            }
        };
        let permit = match &self.permits {
            None => None,
            Some(permits) => match permits.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => return Some((stream, self.over_capacity(peer))),
            },
        };
        if std::mem::take(&mut self.full) {
            info!(
                max = self.max_connections,
                "Below the connection cap again; accepting."
            );
        }
        let io = TokioIo::new(Tracked {
            stream,
            _held: Held::new(permit, values.clone(), self.metrics.map(|m| m.open)),
        });
        let router = self.router.clone();
        let keep_alive = self.keep_alive;
        // Whether a whole request head ever arrived: until then nothing is in flight, and a
        // stop closes the connection at once rather than wait for a head that may never
        // come.
        let started = Arc::new(AtomicBool::new(false));
        let starts = started.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            starts.store(true, Ordering::Relaxed);
            let mut req = req.map(Body::new);
            req.extensions_mut().insert(ConnectInfo(peer));
            req.extensions_mut().extend(values.clone());
            // A router is always ready: no `poll_ready` first.
            let answer = router.clone().call(req);
            async move {
                let mut response = answer.await?;
                // hyper's own `keep_alive(false)` would also mark a `101` `close`, which
                // breaks the upgrade; a `Connection: close` of ours makes hyper close the
                // connection after any other answer.
                if !keep_alive && response.status() != StatusCode::SWITCHING_PROTOCOLS {
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(response)
            }
        });
        let conn = self.http.serve_connection(io, service).with_upgrades();
        let mut closing = closing.clone();
        let span = tracing::debug_span!("connection", peer = %peer);
        conns.spawn(
            async move {
                tokio::pin!(conn);
                // A dropped sender (the server task is ending) also means close.
                let closing = async move {
                    let _ = closing.wait_for(|closing| *closing).await;
                };
                let served = tokio::select! {
                    served = conn.as_mut() => served,
                    () = closing => {
                        if !started.load(Ordering::Relaxed) {
                            return;
                        }
                        // Closes at once if idle between requests; else once the request
                        // in flight is answered.
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                match served {
                    Ok(()) => {}
                    Err(e) if e.is_timeout() => {
                        debug!("Closed a connection that sent no request head in time.");
                    }
                    Err(e) => debug!(error = %e, "A connection ended with an error."),
                }
            }
            .instrument(span),
        );
        None
    }

    /// Counts and logs a connection past the cap; returns its answer.
    fn over_capacity(&mut self, peer: SocketAddr) -> Arc<str> {
        if let Some(metrics) = self.metrics {
            ::metrics::counter!(metrics.refused).increment(1);
        }
        let max = self.max_connections.unwrap_or_default();
        if !std::mem::replace(&mut self.full, true) {
            warn!(
                max,
                "Connection cap reached; answering new connections 503 until one closes."
            );
        }
        debug!(peer = %peer, max, "Refused a connection past the cap.");
        self.refusal.clone()
    }

    fn reap(&self, joined: Result<(), JoinError>) {
        if let Err(e) = joined
            && e.is_panic()
        {
            warn!(server = self.name, error = %e, "A connection task panicked.");
        }
    }
}

/// Answers a refused connection with its fixed 503 and closes it. While few do, each
/// lingers (at most [`REFUSAL_LINGER`]) until the client has read the answer, so the close
/// does not reset the connection under it; past [`MAX_LINGERING_REFUSALS`] the answer is
/// written without waiting.
fn refuse(stream: TcpStream, peer: SocketAddr, answer: Arc<str>, refusals: &mut JoinSet<()>) {
    if refusals.len() < MAX_LINGERING_REFUSALS {
        let span = tracing::debug_span!("refused_connection", peer = %peer);
        refusals.spawn(
            async move {
                let _ =
                    tokio::time::timeout(REFUSAL_LINGER, answer_and_close(stream, &answer)).await;
            }
            .instrument(span),
        );
    } else {
        // A fresh socket's send buffer takes a few hundred bytes at once.
        let _ = stream.try_write(answer.as_bytes());
    }
}

/// Binds `addr` as the standard library does (`SO_REUSEADDR`), with a [`BACKLOG`] of its own.
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// The whole answer to a connection past the cap.
fn over_capacity_answer(name: &str, max: usize) -> String {
    refusal_answer(
        "too_many_connections",
        &format!("the {name} endpoint has its maximum of {max} connections open; retry later"),
    )
}

/// A whole `503` with `Retry-After: 1` and the JSON error `code` / `message`.
fn refusal_answer(code: &str, message: &str) -> String {
    let body = serde_json::json!({ "error": { "code": code, "message": message } }).to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Writes `answer`, half-closes, and reads what the client sent until it closes too.
async fn answer_and_close(mut stream: TcpStream, answer: &str) -> io::Result<()> {
    stream.write_all(answer.as_bytes()).await?;
    stream.shutdown().await?;
    let mut sink = [0u8; 1024];
    while stream.read(&mut sink).await? > 0 {}
    Ok(())
}

/// Errors of one connection that failed between the SYN and `accept`: the loop goes on.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// An admitted connection's socket, carrying what must live exactly as long as the
/// connection: after an upgrade hyper hands this very value on inside the upgraded socket.
struct Tracked {
    stream: TcpStream,
    _held: Held,
}

/// A connection's place under the cap, its hook values and its share of the open gauge;
/// all given back on drop.
struct Held {
    _permit: Option<OwnedSemaphorePermit>,
    _values: Extensions,
    gauge: Option<&'static str>,
}

impl Held {
    fn new(
        permit: Option<OwnedSemaphorePermit>,
        values: Extensions,
        gauge: Option<&'static str>,
    ) -> Self {
        if let Some(gauge) = gauge {
            ::metrics::gauge!(gauge).increment(1.0);
        }
        Self {
            _permit: permit,
            _values: values,
            gauge,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(gauge) = self.gauge {
            ::metrics::gauge!(gauge).decrement(1.0);
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervision::{ChildSpec, Jitter, NodeState, Policy, Restart, Tree, TreeOptions};
    use axum::routing::get;
    use tokio::sync::Notify;

    const DEADLINE: Duration = Duration::from_secs(5);

    /// A tree whose only child serves `router` with `limits`; returns it and the address.
    async fn serving(router: Router, limits: ServeLimits) -> (Tree, SocketAddr) {
        let bound = Arc::new(watch::Sender::new(None));
        let b = bound.clone();
        let spec = ChildSpec::new(
            "web",
            "test",
            Restart::Permanent,
            move |ctx: ChildContext| {
                let args = ServeArgs {
                    name: "test",
                    bind: ([127, 0, 0, 1], 0).into(),
                    router: router.clone(),
                    bound: b.clone(),
                    on_tick: None,
                    limits: limits.clone(),
                    on_accept: None,
                };
                ServeActor::start(ctx, args)
            },
        );
        let tree = Tree::start(vec![spec], TreeOptions::default())
            .await
            .expect("tree");
        let addr = bound.borrow().expect("bound");
        (tree, addr)
    }

    /// Reads until the peer closes (or resets) the connection.
    async fn read_to_close(stream: &mut TcpStream) -> String {
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
            .await
            .expect("closed within the deadline");
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// A stop frees the port, closes every connection with no request in flight at once —
    /// silent, half a request head, idle after an answer — and lets the request in flight
    /// finish.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_closes_idle_connections_at_once_and_lets_requests_in_flight_finish() {
        let entered = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let (e, r) = (entered.clone(), release.clone());
        let router = Router::new()
            .route("/fast", get(|| async { "fast" }))
            .route(
                "/slow",
                get(move || {
                    let (e, r) = (e.clone(), r.clone());
                    async move {
                        e.notify_one();
                        r.notified().await;
                        "slow"
                    }
                }),
            );
        let limits = ServeLimits {
            header_read_timeout: Duration::from_secs(30),
            max_connections: None,
            keep_alive: true,
            metrics: None,
        };
        let (tree, addr) = serving(router, limits).await;
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        let mut partial = TcpStream::connect(addr).await.expect("connect");
        partial.write_all(b"GET /fa").await.expect("write");
        let mut idle = TcpStream::connect(addr).await.expect("connect");
        idle.write_all(b"GET /fast HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("write");
        let mut first = [0u8; 64];
        let n = idle.read(&mut first).await.expect("answer");
        assert!(first[..n].starts_with(b"HTTP/1.1 200"));
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("write");
        tokio::time::timeout(DEADLINE, entered.notified())
            .await
            .expect("the slow request is in flight");

        let t = tokio::time::Instant::now();
        let shutdown = tree.shutdown(DEADLINE);
        tokio::pin!(shutdown);
        let closed = async {
            read_to_close(&mut silent).await;
            read_to_close(&mut partial).await;
            read_to_close(&mut idle).await;
            t.elapsed()
        };
        let closed_in = tokio::select! {
            closed_in = closed => closed_in,
            _ = &mut shutdown => panic!("the stop ended with a request still in flight"),
        };
        assert!(closed_in < DRAIN / 2, "closed after {closed_in:?}");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "the port is still accepting"
        );
        release.notify_one();
        let answer = read_to_close(&mut slow).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("slow"), "{answer}");
        let report = shutdown.await;
        assert!(report.graceful, "{report:?}");
    }

    /// Past the cap a connection is answered 503 without reading its request; a place
    /// frees when a connection closes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn past_the_cap_connections_are_answered_503_until_one_closes() {
        let router = Router::new().route("/", get(|| async { "ok" }));
        let limits = ServeLimits {
            header_read_timeout: Duration::from_secs(30),
            max_connections: Some(1),
            keep_alive: true,
            metrics: None,
        };
        let (tree, addr) = serving(router, limits).await;
        let held = TcpStream::connect(addr).await.expect("connect");
        let mut refused = TcpStream::connect(addr).await.expect("connect");
        let answer = read_to_close(&mut refused).await;
        assert!(
            answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{answer}"
        );
        assert!(answer.contains("\r\nRetry-After: 1\r\n"), "{answer}");
        assert!(answer.contains("maximum of 1 connections"), "{answer}");
        drop(held);
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .await
                .expect("write");
            let answer = read_to_close(&mut stream).await;
            if answer.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{answer}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = tree.shutdown(DEADLINE).await;
    }

    /// A server task that dies (here: panics, reporting through the actor's end report)
    /// fails the actor as transient; the supervisor restarts it on a new port binding.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_server_task_fails_the_actor() {
        let bound = Arc::new(watch::Sender::new(None));
        let mut policy = Policy::default();
        policy.backoff.initial = Duration::from_millis(10);
        let b = bound.clone();
        let spec = ChildSpec::new(
            "web",
            "test",
            Restart::Permanent,
            move |ctx: ChildContext| {
                let args = ServeArgs {
                    name: "test",
                    bind: ([127, 0, 0, 1], 0).into(),
                    router: Router::new(),
                    bound: b.clone(),
                    on_tick: None,
                    limits: ServeLimits {
                        header_read_timeout: Duration::from_secs(10),
                        max_connections: None,
                        keep_alive: true,
                        metrics: None,
                    },
                    on_accept: None,
                };
                ServeActor::start(ctx, args)
            },
        )
        .with_policy(policy);
        let tree = Tree::start(
            vec![spec],
            TreeOptions {
                jitter: Jitter::fixed(0.0),
                ..TreeOptions::default()
            },
        )
        .await
        .expect("tree");
        assert!(bound.borrow().is_some(), "bound before the start returns");
        let cell = tree
            .handle()
            .root_cell()
            .get_children()
            .into_iter()
            .next()
            .expect("child");
        let actor: ActorRef<ServeMsg> = cell.into();
        let blow_up = async { panic!("the server task blew up (expected by this test)") };
        let task = task::spawn(
            "server",
            tracing::Span::none(),
            blow_up,
            end_report(actor, "test"),
        );
        assert!(task.await.is_err());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let node = tree
                .handle()
                .snapshot()
                .find("root/web")
                .cloned()
                .expect("node");
            if node.state == NodeState::Running && node.generation == 2 {
                let f = node.last_failure.expect("failure");
                assert_eq!(
                    (f.class.as_str(), f.reason.as_str()),
                    ("transient", "the server task panicked")
                );
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not restarted: {node:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            bound.borrow().is_some(),
            "the new incarnation published its address"
        );
    }
}
