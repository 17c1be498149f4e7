//! The admin HTTP endpoint: health, readiness, metrics, the tree, config, operator actions.
//!
//! * [`router`] — the routes, over an [`AdminState`]: `GET /` (the tree page, with
//!   `/page.js` and `/page.css`: no data, no token, a strict Content-Security-Policy),
//!   `GET /healthz`, `GET /readyz`, `GET /metrics`, `GET /admin/tree` (`?format=text` for
//!   a drawing), `GET /admin/config`, `POST /admin/reload` and
//!   `POST /admin/actors/{path}/{restart|stop|start|kill}`. Every error is one JSON
//!   shape, `{"error":{"code":"…","message":"…"}}`. A request whose `Origin` header names
//!   another site than the endpoint's own gets 403 `forbidden_origin` before anything else
//!   (see `require_own_origin`): a page elsewhere cannot drive the endpoint through the
//!   operator's browser.
//! * Serving: the [`ServeActor`] accept loop, HTTP/1.1, a connection closed unless it sends
//!   a whole request head within [`HEADER_READ_TIMEOUT`], at most [`MAX_CONNECTIONS`] open
//!   (the next one gets 503 with `Retry-After: 1`), and **no keep-alive**: every connection
//!   is closed after its one answer. A client repeating `GET /healthz` on kept-alive
//!   connections therefore holds no place between requests and cannot fill the cap;
//!   `warden health` (one request per connection anyway) gets in as soon as the answers
//!   are written. What keep-alive off does not bound: connections that never send a
//!   request head, each held up to [`HEADER_READ_TIMEOUT`]; 256 of them from a local
//!   process still refuse `warden health` while they last (there is no per-address cap
//!   here: the probe itself comes from loopback, so it would be refused with them).
//! * [`spec`] — the admin actor, so the endpoint is a supervised child like any other.
//! * [`fetch_tree_text`] / [`check_health`] — the client side, for `warden tree` and
//!   `warden health`.
//! * [`install_metrics`] — the process's Prometheus recorder.
//!
//! ## Messages
//! The admin actor is a [`ServeActor`] (`warden_actors::serve`) running this module's
//! router. It gets `ServeMsg::Tick` every `serve::TICK` (5 s: metrics upkeep, the hook
//! [`spec`] gives it; a heartbeat; a check that the server task still runs) and
//! `ServeMsg::Ended` when its server task ends on its own (an error, a panic). It answers no
//! requests: HTTP is served by a task it owns.
//!
//! ## Supervision
//! Its parent is the root supervisor (kind `admin`, id `admin`). It has no child actors; it
//! owns the server task, which owns one task per connection, and the tick timer. A stop
//! ends the timer, stops accepting, lets the requests in flight finish within
//! `serve::DRAIN` (2 s) and aborts what is left; a kill drops its state, which aborts the
//! timer and the server task at once.
//!
//! ## Restart policy
//! Permanent. A bind error fails the start as `transient` (the port may be free on the next
//! try); a non-loopback bind without a token fails it as `fatal` (a config error); the
//! server task ending on its own fails the actor as `transient`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};
use ractor::SpawnErr;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use warden_actors::inbox::Inbox;

use crate::reload::{Live, ReloadError};
use warden_actors::serve::{ServeActor, ServeArgs, ServeLimits, TickHook};
use warden_actors::supervision::{
    ChildContext, ChildSpec, ControlAction, Failure, NodeState, Policy, ROOT, Restart,
    SupervisorError, TreeHandle,
};

/// The kind of the admin child, for policies and metrics.
pub const KIND: &str = "admin";

/// The admin actor's built-in policy: the gateway listener's, as both are an endpoint
/// operators and clients rely on — 200 ms → 5 s, at most 5 failures in 60 s, then `exit`
/// (75), also on a fatal failure (78); otherwise [`Policy::DEFAULT`].
pub const DEFAULT_POLICY: Policy = warden_actors::gateway::listener::DEFAULT_POLICY;

/// `[admin]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Address of the admin endpoint. Default `127.0.0.1:18790`. A non-loopback address
    /// requires a token.
    pub bind: SocketAddr,
    /// Bearer token for everything but `/healthz` and `/readyz`. Secret.
    pub token: Option<String>,
    /// File holding `token`.
    pub token_file: Option<PathBuf>,
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 18790)),
            token: None,
            token_file: None,
        }
    }
}

/// How often the admin actor runs metrics upkeep and reports its heartbeat.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// How long a stopping admin actor lets in-flight requests finish before it aborts them.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection that has not sent a whole request head within this long (from accept) is
/// closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Open connections at most; the next one is answered 503 with `Retry-After: 1`. Probes,
/// scrapes and the CLI need a handful.
pub const MAX_CONNECTIONS: usize = 256;

/// How long the client waits for an answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The content type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

// ---------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------

/// What the admin routes read. Cheap to clone: every field is shared.
#[derive(Clone)]
pub struct AdminState {
    /// The tree this endpoint serves. The admin actor is itself a child of that tree, so
    /// the handle is set (once, by the program) after `Tree::start` returns; until then the
    /// routes that read the tree answer 503 `starting`.
    tree: Arc<OnceLock<TreeHandle>>,
    /// The inbox, whose figures the tree shows per account; set once by the program.
    inbox: Arc<OnceLock<Inbox>>,
    /// The process's Prometheus recorder, if metrics are on.
    metrics: Option<PrometheusHandle>,
    /// The document `/admin/config` serves, prepared (and masked) by the caller; a reload
    /// replaces it.
    config: Arc<std::sync::RwLock<Arc<serde_json::Value>>>,
    /// The running config's handles, in `warden run`: `POST /admin/reload` and the config
    /// generation the tree shows.
    live: Arc<OnceLock<Arc<Live>>>,
    /// The bearer token; `None` leaves every route open.
    token: Option<Arc<str>>,
    /// When the process started (for `uptime_ms`).
    started_at: Instant,
    /// Where the current incarnation of the admin actor listens; `None` while it does not.
    bound: Arc<watch::Sender<Option<SocketAddr>>>,
    /// The admin actor's own path, set when it first starts: actions on it (or above it)
    /// are refused, since they would cut off their own answer.
    own_path: Arc<OnceLock<String>>,
    /// Extra fields for `/healthz` (e.g. a node's connection), if the program has any.
    health: Option<HealthProbe>,
}

/// Adds fields to the `/healthz` body: called on every request, must be cheap.
pub type HealthProbe = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

impl AdminState {
    /// A state serving `config` at `/admin/config`, guarded by `token` when one is given,
    /// exposing `metrics` at `/metrics` when given. The tree is set later with
    /// [`AdminState::set_tree`].
    pub fn new(
        config: serde_json::Value,
        token: Option<String>,
        metrics: Option<PrometheusHandle>,
    ) -> Self {
        Self {
            tree: Arc::new(OnceLock::new()),
            metrics,
            config: Arc::new(std::sync::RwLock::new(Arc::new(config))),
            live: Arc::new(OnceLock::new()),
            token: token.map(Arc::from),
            started_at: Instant::now(),
            bound: Arc::new(watch::Sender::new(None)),
            own_path: Arc::new(OnceLock::new()),
            health: None,
            inbox: Arc::new(OnceLock::new()),
        }
    }

    /// Hands the inbox to the endpoint, whose tree then shows its figures per account.
    pub fn set_inbox(&self, inbox: Inbox) -> Result<(), Inbox> {
        self.inbox.set(inbox)
    }

    /// Hands the running config's handles to the endpoint: `POST /admin/reload` works and
    /// the tree shows the config generation. Only the first call has an effect.
    pub fn set_live(&self, live: Arc<Live>) -> Result<(), Arc<Live>> {
        self.live.set(live)
    }

    /// Replaces the document `/admin/config` serves (after a reload).
    pub fn set_config(&self, config: serde_json::Value) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
    }

    /// Adds `probe`'s fields to every `/healthz` answer.
    pub fn with_health(mut self, probe: HealthProbe) -> Self {
        self.health = Some(probe);
        self
    }

    /// Hands the running tree to the endpoint. Only the first call has an effect; a second
    /// one returns its handle back.
    pub fn set_tree(&self, handle: TreeHandle) -> Result<(), TreeHandle> {
        self.tree.set(handle)
    }

    /// The tree, once set.
    pub fn tree(&self) -> Option<&TreeHandle> {
        self.tree.get()
    }

    /// Where the admin endpoint listens now, if it does.
    pub fn bound_addr(&self) -> Option<SocketAddr> {
        *self.bound.borrow()
    }

    /// Waits until the admin endpoint listens and returns its address (the real port when
    /// it was bound to port 0).
    pub async fn wait_bound(&self) -> SocketAddr {
        let mut rx = self.bound.subscribe();
        loop {
            if let Some(addr) = *rx.borrow_and_update() {
                return addr;
            }
            if rx.changed().await.is_err() {
                // Cannot happen: `self` holds the sender.
                std::future::pending::<()>().await;
            }
        }
    }

    fn tree_or_starting(&self) -> Result<&TreeHandle, ApiError> {
        self.tree.get().ok_or(ApiError::Starting)
    }

    fn uptime_ms(&self) -> u64 {
        millis(self.started_at.elapsed())
    }
}

impl fmt::Debug for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminState")
            .field("tree_set", &self.tree.get().is_some())
            .field("metrics", &self.metrics.is_some())
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("bound", &self.bound_addr())
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------

/// The admin routes. With a token configured, everything but `/healthz` and `/readyz`
/// (unknown paths included) needs `Authorization: Bearer <token>`.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(page_html))
        .route("/page.js", get(page_js))
        .route("/page.css", get(page_css))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/admin/tree", get(tree))
        .route("/admin/config", get(config))
        .route("/admin/reload", post(reload))
        .route("/admin/actors/{*path}", post(control))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_own_origin,
        ))
        .with_state(state)
}

/// Refuses (403) a request whose `Origin` header names another site than the endpoint's
/// own: a page elsewhere must not drive the endpoint through the operator's browser
/// (`POST /admin/actors/…/kill`). Browsers send `Origin` on every POST and cross-origin
/// fetch; other clients send none and pass. The own origin is `http://` or `https://`
/// followed by the request's `Host`. Without an admin token, the `Host` must also be a
/// loopback name (`localhost`, `127.x.x.x`, `[::1]`) on every request, `Origin` or not: a
/// page whose own name resolves to 127.0.0.1 (DNS rebinding) is same-origin by the `Host`
/// alone, and its GETs carry no `Origin`.
async fn require_own_origin(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    // Without a token, a non-loopback `Host` is a page that rebound its name to this
    // address (a same-origin GET carries no `Origin`): refused whatever it asks.
    if state.token.is_none() && !host.is_empty() && !is_loopback_host(host) {
        debug!(path = %req.uri().path(), host = ?host, "Refused an admin request for a non-loopback host without admin.token.");
        return ApiError::ForeignHost(host.to_string()).into_response();
    }
    let foreign = headers
        .get_all(header::ORIGIN)
        .iter()
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
        .find(|origin| !is_own_origin(origin, host, state.token.is_some()));
    match foreign {
        None => next.run(req).await,
        Some(origin) => {
            debug!(path = %req.uri().path(), origin = ?origin, host = ?host, "Refused an admin request from a foreign origin.");
            ApiError::ForeignOrigin(origin).into_response()
        }
    }
}

/// Whether `origin` is `http(s)://<host>`, `host` being the request's `Host` header; with
/// no token, only a loopback host is anyone's own.
fn is_own_origin(origin: &str, host: &str, with_token: bool) -> bool {
    let Some((scheme, authority)) = origin.trim().split_once("://") else {
        return false;
    };
    let scheme_ok = scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https");
    let host = host.trim();
    scheme_ok
        && !host.is_empty()
        && authority.eq_ignore_ascii_case(host)
        && (with_token || is_loopback_host(host))
}

/// `localhost`, an IPv4 loopback address or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or(rest, |(ip, _)| ip),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `/healthz` and `/readyz` answer without a token: probes carry none. Nor do the tree
/// page's three files, which carry no data (the page asks for the token and sends it with
/// every data request).
fn is_probe(path: &str) -> bool {
    matches!(
        path,
        "/healthz" | "/readyz" | "/" | "/page.js" | "/page.css"
    )
}

/// The tree page's policy: its own script, style and requests only; no inline code, no
/// frames, no forms, no other origin.
const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                        connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                        form-action 'none'; frame-ancestors 'none'";

/// One file of the tree page, with its type and [`PAGE_CSP`].
fn page_file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(PAGE_CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

/// `GET /`: the tree page (`src/admin/page.html`), which holds no data.
async fn page_html() -> Response {
    page_file("text/html; charset=utf-8", include_str!("admin/page.html"))
}

/// `GET /page.js`: the page's script, which polls `/admin/tree` and `/readyz`.
async fn page_js() -> Response {
    page_file(
        "text/javascript; charset=utf-8",
        include_str!("admin/page.js"),
    )
}

/// `GET /page.css`.
async fn page_css() -> Response {
    page_file("text/css; charset=utf-8", include_str!("admin/page.css"))
}

async fn require_token(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    let Some(expected) = state.token.as_deref() else {
        return next.run(req).await;
    };
    if is_probe(req.uri().path()) {
        return next.run(req).await;
    }
    match bearer(req.headers()) {
        Some(provided) if token_matches(expected, provided) => next.run(req).await,
        provided => {
            debug!(path = %req.uri().path(), with_token = provided.is_some(), "Refused an admin request without a valid token.");
            ApiError::Unauthorized.into_response()
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares in constant time. The time depends on the expected token's length only, not
/// on where the tokens differ nor on whether their lengths match. An empty token never
/// matches, so an empty configured token locks the routes rather than opening them.
fn token_matches(expected: &str, provided: &str) -> bool {
    let (expected, provided) = (expected.as_bytes(), provided.as_bytes());
    if expected.is_empty() || provided.is_empty() {
        return false;
    }
    let mut padded = vec![0u8; expected.len()];
    for (slot, byte) in padded.iter_mut().zip(provided) {
        *slot = *byte;
    }
    let same_len = (expected.len() as u64).ct_eq(&(provided.len() as u64));
    bool::from(padded.as_slice().ct_eq(expected) & same_len)
}

/// `/healthz` payload.
#[derive(Debug, Serialize)]
struct Health {
    /// `ok`, `starting` (the tree is not handed over yet) or `down` (the root stopped).
    status: &'static str,
    uptime_ms: u64,
    /// The program's extra fields (a node's `connected`, `last_connected_at`, …).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    extra: Option<serde_json::Value>,
}

/// `/readyz` payload.
#[derive(Debug, Serialize)]
struct Ready {
    /// `ready` or `not_ready`.
    status: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    failing: Vec<String>,
}

/// The answer to an operator action.
#[derive(Debug, Serialize)]
struct ActionDone {
    ok: bool,
    path: String,
    action: String,
}

async fn healthz(State(state): State<AdminState>) -> Response {
    let uptime_ms = state.uptime_ms();
    let (code, status) = match state.tree.get() {
        None => (StatusCode::OK, "starting"),
        Some(tree) if tree.is_running() => (StatusCode::OK, "ok"),
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, "down"),
    };
    let extra = state.health.as_ref().map(|probe| probe());
    (
        code,
        axum::Json(Health {
            status,
            uptime_ms,
            extra,
        }),
    )
        .into_response()
}

/// `?path=P` of `/readyz`: the readiness of the subtree at `P` alone.
#[derive(Debug, Deserialize)]
struct ReadyQuery {
    path: Option<String>,
}

/// 200 when the tree (or, with `?path=P`, the subtree at `P`) runs and nothing in it keeps
/// it from being ready; else 503 naming what does. An unknown `P` is 404: a probe that
/// names a path that does not exist must fail, not pass. `P` is a child of the root
/// (`root/gateway`, `root/channels` …), whose names are fixed: this route needs no token,
/// and deeper paths would let anyone probe which account aliases exist.
async fn readyz(State(state): State<AdminState>, uri: Uri) -> Result<Response, ApiError> {
    let Query(query) = Query::<ReadyQuery>::try_from_uri(&uri)
        .map_err(|_| ApiError::BadRequest("the query string is malformed".to_string()))?;
    if let Some(path) = query.path.as_deref() {
        let child = path.strip_prefix(ROOT).and_then(|p| p.strip_prefix('/'));
        if !child.is_some_and(|c| !c.is_empty() && !c.contains('/')) {
            return Err(ApiError::BadRequest(
                "path: only a child of the root is asked here, e.g. root/gateway".to_string(),
            ));
        }
    }
    let failing = match state.tree.get() {
        None => vec![ROOT.to_string()],
        Some(tree) => {
            let snapshot = tree.snapshot();
            let scope = match query.path.as_deref() {
                None => &snapshot,
                Some(path) => snapshot.find(path).ok_or_else(|| {
                    ApiError::NotFound(format!("no actor at {path:?} in the tree"))
                })?,
            };
            if scope.state == NodeState::Running {
                scope.not_ready()
            } else {
                vec![scope.path.to_string()]
            }
        }
    };
    let (code, status) = if failing.is_empty() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not_ready")
    };
    Ok((code, axum::Json(Ready { status, failing })).into_response())
}

async fn metrics_text(State(state): State<AdminState>) -> Result<Response, ApiError> {
    let handle = state.metrics.as_ref().ok_or(ApiError::MetricsOff)?;
    let body = handle.render();
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(PROMETHEUS_TEXT),
        )],
        body,
    )
        .into_response())
}

/// `?format=json|text` of `/admin/tree`.
#[derive(Debug, Deserialize)]
struct TreeQuery {
    format: Option<String>,
}

async fn tree(State(state): State<AdminState>, uri: Uri) -> Result<Response, ApiError> {
    let Query(query) = Query::<TreeQuery>::try_from_uri(&uri)
        .map_err(|_| ApiError::BadRequest("the query string is malformed".to_string()))?;
    let handle = state.tree_or_starting()?.clone();
    // The inbox's figures go on each account's node (and under the drawing).
    let stats = match state.inbox.get() {
        Some(inbox) => inbox.stats().await.ok(),
        None => None,
    };
    let status = state.live.get().map(|live| live.status());
    let text = match query.format.as_deref() {
        None | Some("json") => false,
        Some("text") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "unknown format {other:?}: expected json or text"
            )));
        }
    };
    // Reading and encoding a tree of thousands of children is milliseconds of CPU: keep it
    // off the runtime's workers, which also run the actors.
    let rendered = tokio::task::spawn_blocking(move || {
        let snapshot = handle.snapshot();
        if text {
            let mut drawing = snapshot.render_text();
            if let Some(stats) = &stats {
                drawing.push_str(&stats.render_text());
            }
            if let Some(status) = &status {
                drawing.push_str(&format!(
                    "config generation {}, applied {}\n",
                    status.generation, status.applied_at
                ));
                if !status.pending_restart.is_empty() {
                    drawing.push_str(&format!(
                        "needs a restart to apply: {}\n",
                        status.pending_restart.join(", ")
                    ));
                }
            }
            Ok(drawing.into_bytes())
        } else {
            let mut tree = serde_json::to_value(&snapshot)?;
            if let Some(stats) = &stats {
                stats.annotate(&mut tree);
            }
            if let (Some(status), Some(root)) = (&status, tree.as_object_mut()) {
                root.insert("config".to_string(), serde_json::to_value(status)?);
            }
            serde_json::to_vec(&tree)
        }
    })
    .await;
    match rendered {
        Ok(Ok(body)) => {
            let content_type = if text {
                "text/plain; charset=utf-8"
            } else {
                "application/json"
            };
            Ok((
                [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
                body,
            )
                .into_response())
        }
        _ => Err(ApiError::Internal("cannot render the tree".to_string())),
    }
}

async fn config(State(state): State<AdminState>) -> Response {
    let config = state
        .config
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    axum::Json(config.as_ref().clone()).into_response()
}

/// `POST /admin/reload`: loads the config again and applies what changed; 200 with what
/// was applied, or 400 `invalid_config` naming the key and its source (nothing changed).
async fn reload(State(state): State<AdminState>) -> Result<Response, ApiError> {
    let live = state.live.get().ok_or_else(|| {
        ApiError::NotFound("config reload is available in warden run only".to_string())
    })?;
    match live.request("POST /admin/reload").await {
        Ok(report) => Ok(axum::Json(report).into_response()),
        Err(ReloadError::Invalid(e)) => Err(ApiError::InvalidConfig(e.to_string())),
        Err(ReloadError::Unavailable(why)) => Err(ApiError::Unavailable(why)),
    }
}

async fn control(
    State(state): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<axum::Json<ActionDone>, ApiError> {
    let Path(rest) = path.map_err(|_| ApiError::BadRequest("the path is malformed".to_string()))?;
    let (node, verb) = rest.rsplit_once('/').ok_or_else(|| {
        ApiError::BadRequest(
            "expected /admin/actors/{path}/{restart|stop|start|kill}, e.g. /admin/actors/root/gateway/restart"
                .to_string(),
        )
    })?;
    let action = ControlAction::from_str(verb)?;
    let tree = state.tree_or_starting()?;
    let node = node.trim_matches('/');
    // The root is refused by the kernel itself, with its own reason.
    if let Some(own) = state.own_path.get()
        && node != ROOT
        && (own == node || own.starts_with(&format!("{node}/")))
    {
        return Err(ApiError::Supervisor(SupervisorError::Conflict {
            path: node.to_string(),
            reason: format!(
                "{own} serves this request and cannot act on itself (the answer would be cut off, \
                 and a stop would lock the endpoint out); restart the process instead"
            ),
        }));
    }
    tree.control(node, action).await?;
    info!(actor = %node, action = verb, "Operator action done over the admin endpoint.");
    Ok(axum::Json(ActionDone {
        ok: true,
        path: node.to_string(),
        action: verb.to_string(),
    }))
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no endpoint at {}", uri.path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Every error the admin endpoint answers, rendered as
/// `{"error":{"code":"…","message":"…"}}`. Messages are written for operators and never
/// carry internal error text beyond what the tree itself shows.
#[derive(Debug)]
enum ApiError {
    /// The tree has not been handed to the endpoint yet (503).
    Starting,
    /// No or a wrong bearer token (401).
    Unauthorized,
    /// A request from a page of another origin (403); the origin it named.
    ForeignOrigin(String),
    /// Without `admin.token`, a request for a host name that is not a loopback one (403).
    ForeignHost(String),
    /// No such endpoint (404).
    NotFound(String),
    /// The endpoint exists, the method does not (405).
    MethodNotAllowed,
    /// A malformed request (400).
    BadRequest(String),
    /// A reload found the config invalid (400); the error names the key and its source.
    InvalidConfig(String),
    /// A reload cannot be served now (503): the process is stopping, or too many wait.
    Unavailable(&'static str),
    /// `/metrics` without a recorder (404).
    MetricsOff,
    /// A supervisor refused an operator action.
    Supervisor(SupervisorError),
    /// Something failed inside the endpoint (500); the detail is logged, not returned.
    Internal(String),
}

impl From<SupervisorError> for ApiError {
    fn from(err: SupervisorError) -> Self {
        ApiError::Supervisor(err)
    }
}

/// The error payload.
#[derive(Debug, Serialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Serialize)]
struct ErrorDetail {
    code: &'static str,
    message: String,
}

impl ApiError {
    fn parts(self) -> (StatusCode, &'static str, String) {
        match self {
            ApiError::Starting => (
                StatusCode::SERVICE_UNAVAILABLE,
                "starting",
                "the supervision tree is starting; try again shortly".to_string(),
            ),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this endpoint needs Authorization: Bearer <admin token>".to_string(),
            ),
            ApiError::ForeignHost(host) => (
                StatusCode::FORBIDDEN,
                "forbidden_host",
                format!(
                    "requests for host {:?} are refused: without admin.token the admin endpoint serves only loopback names",
                    host.chars().take(200).collect::<String>()
                ),
            ),
            ApiError::ForeignOrigin(origin) => (
                StatusCode::FORBIDDEN,
                "forbidden_origin",
                format!(
                    "requests from origin {:?} are refused: the admin endpoint serves only its own origin",
                    origin.chars().take(200).collect::<String>()
                ),
            ),
            ApiError::NotFound(message) => (StatusCode::NOT_FOUND, "not_found", message),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not accept that method".to_string(),
            ),
            ApiError::BadRequest(message) => (StatusCode::BAD_REQUEST, "bad_request", message),
            ApiError::InvalidConfig(message) => {
                (StatusCode::BAD_REQUEST, "invalid_config", message)
            }
            ApiError::Unavailable(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                why.to_string(),
            ),
            ApiError::Internal(detail) => {
                warn!(detail = %detail, "Admin endpoint error.");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the admin endpoint failed; see its log".to_string(),
                )
            }
            ApiError::MetricsOff => (
                StatusCode::NOT_FOUND,
                "not_found",
                "metrics are not enabled in this process".to_string(),
            ),
            ApiError::Supervisor(err) => {
                let (status, code) = match &err {
                    SupervisorError::UnknownChild(_) => (StatusCode::NOT_FOUND, "unknown_actor"),
                    SupervisorError::BadAction(_) => (StatusCode::BAD_REQUEST, "bad_action"),
                    SupervisorError::Conflict { .. } => (StatusCode::CONFLICT, "conflict"),
                    // The endpoint did its job; the actor it started did not come up. Like a
                    // gateway reporting a failing upstream, and unlike a 500, this does not
                    // say the admin endpoint itself is broken. The supervisor already
                    // scheduled the next try by the child's policy.
                    SupervisorError::StartFailed { .. } => {
                        (StatusCode::BAD_GATEWAY, "start_failed")
                    }
                    SupervisorError::ShuttingDown => {
                        (StatusCode::SERVICE_UNAVAILABLE, "shutting_down")
                    }
                    SupervisorError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
                };
                // The kernel's messages name the path and an operator-facing reason (the
                // same text the tree shows as `last_failure`).
                (status, code, err.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = self.parts();
        if status.is_server_error() {
            warn!(status = status.as_u16(), code, message = %message, "Admin request failed.");
        } else {
            debug!(status = status.as_u16(), code, message = %message, "Admin request refused.");
        }
        let body = axum::Json(ErrorBody {
            error: ErrorDetail { code, message },
        });
        let mut response = (status, body).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

// ---------------------------------------------------------------------------------------
// The admin actor
// ---------------------------------------------------------------------------------------

/// The admin child: a [`ServeActor`] serving [`router`] over `state` on `settings.bind`,
/// running metrics upkeep on its tick.
///
/// The token comes from `state` (the caller resolves `token` / `token_file`); `settings`
/// gives the address. A non-loopback address without a token fails the start as fatal.
pub fn spec(settings: &AdminSettings, state: AdminState, policy: Policy) -> ChildSpec {
    let bind = settings.bind;
    ChildSpec::new("admin", KIND, Restart::Permanent, move |ctx: ChildContext| {
        let state = state.clone();
        async move {
            if !bind.ip().is_loopback() && state.token.is_none() {
                return Err(SpawnErr::StartupFailed(Box::new(Failure::fatal(format!(
                    "refusing to serve the admin endpoint on non-loopback {bind} without admin.token"
                )))));
            }
            // The same path for every incarnation; only the first set has an effect.
            let _ = state.own_path.set(ctx.path.clone());
            let on_tick = state.metrics.clone().map(|metrics| -> TickHook {
                Arc::new(move || metrics.run_upkeep())
            });
            let args = ServeArgs {
                name: "admin",
                bind,
                router: router(state.clone()),
                bound: state.bound.clone(),
                on_tick,
                limits: ServeLimits {
                    header_read_timeout: HEADER_READ_TIMEOUT,
                    max_connections: Some(MAX_CONNECTIONS),
                    keep_alive: false,
                    metrics: None,
                },
                on_accept: None,
            };
            ServeActor::start(ctx, args).await
        }
    })
    .with_policy(policy)
}

// ---------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------

/// The Prometheus recorder could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the Prometheus metrics recorder: {0}")]
pub struct MetricsError(#[from] BuildError);

/// Installs the process-wide Prometheus recorder and describes the kernel's and the
/// gateway's metrics.
///
/// Call it once, before starting the tree (metrics recorded earlier are lost), and pass
/// the handle to [`AdminState::new`]: the admin actor serves it at `/metrics` and runs its
/// upkeep every [`UPKEEP_INTERVAL`].
pub fn install_metrics() -> Result<PrometheusHandle, MetricsError> {
    let handle = PrometheusBuilder::new().install_recorder()?;
    warden_actors::describe_metrics();
    Ok(handle)
}

// ---------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------

/// Why a call to the admin endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer: refused, reset, timed out, or a bad URL.
    #[error("cannot reach {url}: {cause}")]
    Unreachable {
        /// The URL called.
        url: String,
        /// What went wrong.
        cause: String,
    },
    /// An answer other than 200.
    #[error("{url} answered {status}: {message}")]
    Status {
        /// The URL called.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The error message of the body, or the status's reason.
        message: String,
    },
}

/// Fetches the drawn tree (`GET /admin/tree?format=text`) from the admin endpoint at
/// `admin_url` (e.g. `http://127.0.0.1:18790`).
pub async fn fetch_tree_text(admin_url: &str, token: Option<&str>) -> Result<String, ClientError> {
    let url = format!("{}/admin/tree?format=text", admin_url.trim_end_matches('/'));
    let client = client(&url)?;
    let mut request = client.get(&url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.map_err(|e| unreachable(&url, &e))?;
    let response = ok_or_status(&url, response).await?;
    response.text().await.map_err(|e| unreachable(&url, &e))
}

/// `POST /admin/reload` at `admin_url`: the lines to print (what changed, what needs a
/// restart), or the error (status 400: the config is invalid and nothing changed).
pub async fn request_reload(admin_url: &str, token: Option<&str>) -> Result<String, ClientError> {
    let url = format!("{}/admin/reload", admin_url.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(RELOAD_TIMEOUT)
        .build()
        .map_err(|e| unreachable(&url, &e))?;
    let mut request = client.post(&url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.map_err(|e| unreachable(&url, &e))?;
    let response = ok_or_status(&url, response).await?;
    let report: serde_json::Value = response.json().await.map_err(|e| unreachable(&url, &e))?;
    let mut text = format!(
        "config generation {} applied at {}\n",
        report["generation"],
        report["applied_at"].as_str().unwrap_or_default()
    );
    let lines = |key: &str| -> Vec<String> {
        report[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let changes = lines("changes");
    if changes.is_empty() {
        text.push_str("nothing changed\n");
    }
    for line in changes {
        text.push_str(&format!("changed: {line}\n"));
    }
    for key in lines("needs_restart") {
        text.push_str(&format!("needs a restart: {key}\n"));
    }
    Ok(text)
}

/// How long a reload may take: stopping a removed account waits for its stop limits.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// Checks `GET /healthz` of the admin endpoint at `admin_url`: `Ok` only on 200.
pub async fn check_health(admin_url: &str) -> Result<(), ClientError> {
    let url = format!("{}/healthz", admin_url.trim_end_matches('/'));
    let client = client(&url)?;
    let response = client
        .get(&url)
        .send()
        .await
        .map_err(|e| unreachable(&url, &e))?;
    ok_or_status(&url, response).await.map(|_| ())
}

fn client(url: &str) -> Result<reqwest::Client, ClientError> {
    reqwest::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .build()
        .map_err(|e| unreachable(url, &e))
}

fn unreachable(url: &str, err: &reqwest::Error) -> ClientError {
    let cause = if err.is_timeout() {
        format!("no answer within {} s", CLIENT_TIMEOUT.as_secs())
    } else {
        // reqwest's own message repeats the URL; name it once.
        let mut cause = without_url(err);
        let mut source = std::error::Error::source(err);
        while let Some(inner) = source {
            cause.push_str(": ");
            cause.push_str(&inner.to_string());
            source = inner.source();
        }
        cause
    };
    ClientError::Unreachable {
        url: url.to_string(),
        cause,
    }
}

fn without_url(err: &reqwest::Error) -> String {
    let text = err.to_string();
    match err.url() {
        Some(url) => text.replace(&format!(" for url ({url})"), ""),
        None => text,
    }
}

async fn ok_or_status(
    url: &str,
    response: reqwest::Response,
) -> Result<reqwest::Response, ClientError> {
    let status = response.status();
    if status == reqwest::StatusCode::OK {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    Err(ClientError::Status {
        url: url.to_string(),
        status: status.as_u16(),
        message: message_of(status, &body),
    })
}

/// The most useful message of an error answer: our JSON error's message, a probe's
/// status, a short body, or the status's reason.
fn message_of(status: reqwest::StatusCode, body: &str) -> String {
    #[derive(Deserialize)]
    struct Shape {
        error: Option<Detail>,
        status: Option<String>,
        failing: Option<Vec<String>>,
    }
    #[derive(Deserialize)]
    struct Detail {
        message: String,
    }
    if let Ok(shape) = serde_json::from_str::<Shape>(body) {
        if let Some(detail) = shape.error {
            return detail.message;
        }
        if let Some(state) = shape.status {
            return match shape.failing {
                Some(failing) if !failing.is_empty() => format!("{state}: {}", failing.join(", ")),
                _ => state,
            };
        }
    }
    let body = body.trim();
    if body.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        body.chars().take(200).collect()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_by_content_and_length() {
        assert!(token_matches("s3cret", "s3cret"));
        assert!(!token_matches("s3cret", "s3creT"));
        assert!(!token_matches("s3cret", "s3cre"));
        assert!(!token_matches("s3cret", "s3cret!"));
        assert!(!token_matches("s3cret", "s3cret\0"));
        assert!(!token_matches("s3cret", ""));
        assert!(!token_matches("", ""));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer abc"),
        );
        assert_eq!(bearer(&headers), Some("abc"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&headers), None);
    }

    #[test]
    fn own_origin_is_the_host_and_without_a_token_a_loopback_one() {
        let host = "127.0.0.1:18790";
        assert!(is_own_origin("http://127.0.0.1:18790", host, false));
        assert!(is_own_origin("HTTPS://127.0.0.1:18790", host, false));
        assert!(!is_own_origin("http://127.0.0.1:8080", host, false));
        assert!(!is_own_origin("https://evil.example", host, false));
        assert!(!is_own_origin("null", host, false));
        assert!(!is_own_origin("ftp://127.0.0.1:18790", host, false));
        assert!(!is_own_origin("http://127.0.0.1:18790", "", false));
        assert!(is_own_origin("http://LocalHost:1", "localhost:1", false));
        assert!(is_own_origin("http://[::1]:1", "[::1]:1", false));
        // DNS rebinding: the names agree, but only a token-guarded endpoint trusts them.
        let rebound = "evil.example:18790";
        assert!(!is_own_origin("http://evil.example:18790", rebound, false));
        assert!(is_own_origin("http://evil.example:18790", rebound, true));
        assert!(!is_loopback_host("127.0.0.1.evil.example"));
        assert!(is_loopback_host("127.0.0.2"));
    }

    #[test]
    fn error_messages_prefer_the_json_message() {
        let status = reqwest::StatusCode::SERVICE_UNAVAILABLE;
        assert_eq!(
            message_of(status, r#"{"error":{"code":"x","message":"m"}}"#),
            "m"
        );
        assert_eq!(
            message_of(status, r#"{"status":"not_ready","failing":["root/a"]}"#),
            "not_ready: root/a"
        );
        assert_eq!(message_of(status, ""), "Service Unavailable");
    }
}
