//! Integration tests: admin. A real tree with small test actors and the admin actor bound
//! to `127.0.0.1:0`, driven over real sockets with reqwest.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use metrics_exporter_prometheus::PrometheusHandle;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use reqwest::StatusCode;
use serde_json::{Value, json};
use warden::admin::{self, AdminSettings, AdminState, ClientError};
use warden_actors::supervision::{
    ChildContext, ChildSpec, ControlAction, NodeSnapshot, NodeState, Policy, Restart, Strategy,
    Tree, TreeOptions,
};

use crate::support::{self, eventually};

/// How long a condition may take before a test fails.
const DEADLINE: Duration = Duration::from_secs(5);

/// A worker that does nothing but run.
struct Worker;

impl Actor for Worker {
    type Msg = ();
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _myself: ActorRef<()>, _args: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
}

/// Restarts fast and without jitter, so tests wait milliseconds.
fn fast_policy() -> Policy {
    let mut policy = Policy::default();
    policy.backoff.initial = Duration::from_millis(10);
    policy.backoff.max = Duration::from_millis(100);
    policy.backoff.jitter = 0.0;
    policy.shutdown_timeout = Duration::from_secs(3);
    policy
}

fn worker(id: &str) -> ChildSpec {
    ChildSpec::new(
        id,
        "worker",
        Restart::Permanent,
        |ctx: ChildContext| async move {
            let (actor, _) = Actor::spawn_linked(None, Worker, (), ctx.supervisor.clone()).await?;
            Ok(actor.get_cell())
        },
    )
    .with_policy(fast_policy())
}

/// The process's one metrics recorder, shared by every test of this binary.
fn metrics() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| admin::install_metrics().map_err(|e| e.to_string()))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn loopback_any_port() -> AdminSettings {
    AdminSettings {
        bind: ([127, 0, 0, 1], 0).into(),
        ..AdminSettings::default()
    }
}

/// A running tree `root → { alpha, group → { beta }, admin }` and a client for its admin
/// endpoint.
struct Fixture {
    tree: Tree,
    state: AdminState,
    base: String,
    http: reqwest::Client,
}

impl Fixture {
    async fn start(token: Option<&str>, with_metrics: bool) -> anyhow::Result<Self> {
        let handle = if with_metrics { Some(metrics()?) } else { None };
        let config = json!({ "admin": { "bind": "127.0.0.1:0", "token": "***" } });
        let state = AdminState::new(config, token.map(str::to_string), handle);
        let fixture = Self::start_unset(state, &loopback_any_port()).await?;
        fixture.set_tree()?;
        Ok(fixture)
    }

    /// Starts the tree without handing it to the endpoint.
    async fn start_unset(state: AdminState, settings: &AdminSettings) -> anyhow::Result<Self> {
        let children = vec![
            worker("alpha"),
            ChildSpec::supervisor("group", Strategy::OneForOne, vec![worker("beta")]),
            admin::spec(settings, state.clone(), fast_policy()),
        ];
        let tree = Tree::start(children, TreeOptions::default()).await?;
        let addr = tokio::time::timeout(DEADLINE, state.wait_bound())
            .await
            .context("the admin endpoint did not bind")?;
        let http = reqwest::Client::builder().timeout(DEADLINE).build()?;
        Ok(Self {
            tree,
            state,
            base: format!("http://{addr}"),
            http,
        })
    }

    fn set_tree(&self) -> anyhow::Result<()> {
        self.state
            .set_tree(self.tree.handle())
            .map_err(|_| anyhow::anyhow!("the tree was already set"))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str, token: Option<&str>) -> anyhow::Result<(StatusCode, String)> {
        let mut request = self.http.get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        Ok((response.status(), response.text().await?))
    }

    async fn get_json(
        &self,
        path: &str,
        token: Option<&str>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let (status, body) = self.get(path, token).await?;
        let value =
            serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON: {body}"))?;
        Ok((status, value))
    }

    /// Sends `req path` and asserts the answer is the error `status` with `code` in the
    /// one error shape; returns the body.
    async fn expect_error(
        &self,
        req: Req,
        path: &str,
        token: Option<&str>,
        status: StatusCode,
        code: &str,
    ) -> anyhow::Result<Value> {
        let (got, body) = match req {
            Req::Get => self.get_json(path, token).await?,
            Req::Post => self.post(path, token).await?,
        };
        assert_eq!(
            (got, error_code(&body)),
            (status, code),
            "{req:?} {path}: {body}"
        );
        Ok(body)
    }

    async fn post(&self, path: &str, token: Option<&str>) -> anyhow::Result<(StatusCode, Value)> {
        let mut request = self.http.post(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status();
        let body = response.text().await?;
        let value = serde_json::from_str(&body)
            .with_context(|| format!("POST {path}: not JSON: {body}"))?;
        Ok((status, value))
    }

    /// Polls `/admin/tree` until `done` holds, or fails with the last snapshot.
    async fn wait_tree(
        &self,
        token: Option<&str>,
        what: &str,
        done: impl Fn(&NodeSnapshot) -> bool,
    ) -> anyhow::Result<NodeSnapshot> {
        let snapshot = eventually(DEADLINE, what, async || {
            let (status, body) = self
                .get("/admin/tree", token)
                .await
                .expect("GET /admin/tree");
            assert_eq!(status, StatusCode::OK, "GET /admin/tree: {body}");
            let snapshot: NodeSnapshot = serde_json::from_str(&body).expect("a tree");
            if done(&snapshot) {
                Ok(snapshot)
            } else {
                Err(format!("the tree\n{}", snapshot.render_text()))
            }
        })
        .await;
        Ok(snapshot)
    }

    /// Polls `path` until it answers `want`, or fails with the last answer.
    async fn wait_status(&self, path: &str, want: StatusCode) -> anyhow::Result<Value> {
        let body = eventually(DEADLINE, format!("GET {path} answers {want}"), async || {
            let (status, body) = self.get_json(path, None).await.expect("an answer");
            if status == want {
                Ok(body)
            } else {
                Err(format!("{status} {body}"))
            }
        })
        .await;
        Ok(body)
    }

    async fn shutdown(self) -> anyhow::Result<()> {
        let report = self.tree.shutdown(DEADLINE).await;
        ensure!(report.graceful, "shutdown was not graceful: {report:?}");
        ensure!(
            self.state.bound_addr().is_none(),
            "the admin endpoint still publishes its address"
        );
        Ok(())
    }
}

/// The two request methods the error checks use.
#[derive(Debug, Clone, Copy)]
enum Req {
    Get,
    Post,
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no error code>")
}

fn child<'a>(snapshot: &'a NodeSnapshot, path: &str) -> Option<&'a NodeSnapshot> {
    snapshot.find(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_tree_and_operator_actions() -> anyhow::Result<()> {
    let fx = Fixture::start(None, false).await?;

    let (status, health) = fx.get_json("/healthz", None).await?;
    assert_eq!(status, StatusCode::OK, "{health}");
    assert_eq!(health["status"], "ok");
    assert!(health["uptime_ms"].is_u64(), "{health}");

    let ready = fx.wait_status("/readyz", StatusCode::OK).await?;
    assert_eq!(ready, json!({ "status": "ready" }));

    // A stopped permanent child fails readiness by name; starting it again cures it.
    let (status, body) = fx.post("/admin/actors/root/group/beta/stop", None).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({ "ok": true, "path": "root/group/beta", "action": "stop" })
    );
    let (status, ready) = fx.get_json("/readyz", None).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    assert_eq!(
        ready,
        json!({ "status": "not_ready", "failing": ["root/group/beta"] })
    );
    // `?path=` scopes readiness to a subtree: the one holding beta is not ready, a sibling
    // is; a path that is not in the tree is 404, never ready.
    let (status, ready) = fx.get_json("/readyz?path=root/group", None).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    assert_eq!(ready["failing"], json!(["root/group/beta"]));
    let (status, ready) = fx.get_json("/readyz?path=root/alpha", None).await?;
    assert_eq!(
        (status, ready),
        (StatusCode::OK, json!({ "status": "ready" }))
    );
    let (status, ready) = fx.get_json("/readyz?path=root/nope", None).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{ready}");
    assert_eq!(error_code(&ready), "not_found");
    // Only children of the root: deeper names (account aliases) are not probed without a
    // token.
    for deep in ["root/group/beta", "root", "other/x", "root/"] {
        let (status, body) = fx.get_json(&format!("/readyz?path={deep}"), None).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{deep}: {body}");
    }
    let (status, body) = fx.post("/admin/actors/root/group/beta/start", None).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    fx.wait_status("/readyz", StatusCode::OK).await?;

    // The tree as JSON and as a drawing.
    let (status, tree) = fx.get("/admin/tree", None).await?;
    assert_eq!(status, StatusCode::OK);
    let tree: NodeSnapshot = serde_json::from_str(&tree)?;
    for path in ["root/alpha", "root/group", "root/group/beta", "root/admin"] {
        assert!(
            child(&tree, path).is_some(),
            "{path} missing from\n{}",
            tree.render_text()
        );
    }
    assert_eq!(child(&tree, "root/admin").map(|n| &*n.kind), Some("admin"));
    let response = fx
        .http
        .get(fx.url("/admin/tree?format=text"))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok());
    assert_eq!(content_type, Some("text/plain; charset=utf-8"));
    let text = response.text().await?;
    assert!(text.starts_with("root  running"), "{text}");
    assert!(
        text.contains("├── alpha  running  permanent  [worker]"),
        "{text}"
    );
    assert!(text.contains("│   └── beta  running"), "{text}");
    assert!(
        text.contains("└── admin  running  permanent  [admin]"),
        "{text}"
    );
    fx.expect_error(
        Req::Get,
        "/admin/tree?format=yaml",
        None,
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await?;

    // A kill is a transient failure: the child comes back as generation 2.
    let (status, body) = fx.post("/admin/actors/root/alpha/kill", None).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["action"], "kill");
    fx.wait_tree(None, "alpha restarted after a kill", |t| {
        child(t, "root/alpha").is_some_and(|a| {
            a.state == NodeState::Running && a.restarts_total == 1 && a.generation == 2
        })
    })
    .await?;

    // Refusals, each in the one error shape.
    fx.expect_error(
        Req::Post,
        "/admin/actors/root/alpha/explode",
        None,
        StatusCode::BAD_REQUEST,
        "bad_action",
    )
    .await?;
    let body = fx
        .expect_error(
            Req::Post,
            "/admin/actors/root/nobody/restart",
            None,
            StatusCode::NOT_FOUND,
            "unknown_actor",
        )
        .await?;
    assert_eq!(body["error"]["message"], "no actor at root/nobody");
    fx.expect_error(
        Req::Post,
        "/admin/actors/root/alpha/start",
        None,
        StatusCode::CONFLICT,
        "conflict",
    )
    .await?;
    let body = fx
        .expect_error(
            Req::Post,
            "/admin/actors/root/restart",
            None,
            StatusCode::CONFLICT,
            "conflict",
        )
        .await?;
    let message = body["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("the root cannot be controlled"), "{body}");
    fx.expect_error(
        Req::Post,
        "/admin/actors/kill",
        None,
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await?;
    // The endpoint does not act on itself: the answer would be cut off.
    fx.expect_error(
        Req::Post,
        "/admin/actors/root/admin/stop",
        None,
        StatusCode::CONFLICT,
        "conflict",
    )
    .await?;
    fx.expect_error(
        Req::Get,
        "/no/such/thing",
        None,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await?;
    fx.expect_error(
        Req::Get,
        "/admin/actors/root/alpha/kill",
        None,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await?;
    fx.expect_error(
        Req::Post,
        "/healthz",
        None,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await?;
    // No metrics recorder in this fixture.
    fx.expect_error(
        Req::Get,
        "/metrics",
        None,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await?;

    let (status, config) = fx.get_json("/admin/config", None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        config,
        json!({ "admin": { "bind": "127.0.0.1:0", "token": "***" } })
    );

    fx.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guards_everything_but_the_probes() -> anyhow::Result<()> {
    let token = "7f0c1e6a-admin-token";
    let fx = Fixture::start(Some(token), false).await?;

    for (header, what) in [
        (None, "no token"),
        (Some("7f0c1e6a-admin-tokeN"), "a wrong token"),
        (Some("short"), "a short token"),
    ] {
        let mut request = fx.http.get(fx.url("/admin/tree"));
        if let Some(wrong) = header {
            request = request.bearer_auth(wrong);
        }
        let response = request.send().await?;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
        let challenge = response
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok());
        assert_eq!(challenge, Some("Bearer"), "{what}");
        let body: Value = response.json().await?;
        assert_eq!(error_code(&body), "unauthorized", "{what}: {body}");
    }
    let response = fx
        .http
        .get(fx.url("/admin/tree"))
        .header("authorization", format!("Basic {token}"))
        .send()
        .await?;
    assert_eq!(
        response.status(),
        StatusCode::UNAUTHORIZED,
        "another scheme"
    );

    let (status, _) = fx.get("/admin/tree", Some(token)).await?;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = fx.get("/admin/config", None).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    fx.expect_error(
        Req::Post,
        "/admin/actors/root/alpha/restart",
        None,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await?;
    let (status, body) = fx
        .post("/admin/actors/root/alpha/restart", Some(token))
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Unknown paths are no way around the token either.
    let (status, _) = fx.get("/no/such/thing", None).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = fx.get("/no/such/thing", Some(token)).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Probes carry no token.
    let (status, _) = fx.get("/healthz", None).await?;
    assert_eq!(status, StatusCode::OK);
    fx.wait_status("/readyz", StatusCode::OK).await?;

    // The CLI client.
    let text = admin::fetch_tree_text(&fx.base, Some(token)).await?;
    assert!(text.contains("alpha  running"), "{text}");
    match admin::fetch_tree_text(&fx.base, None).await {
        Err(ClientError::Status {
            status: 401, url, ..
        }) => {
            assert_eq!(url, format!("{}/admin/tree?format=text", fx.base));
        }
        other => bail!("expected a 401 without the token, got {other:?}"),
    }
    admin::check_health(&format!("{}/", fx.base)).await?;

    fx.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_elsewhere_cannot_post_actions() -> anyhow::Result<()> {
    let fx = Fixture::start(None, false).await?;
    fx.wait_status("/readyz", StatusCode::OK).await?;
    let port = fx.base.rsplit_once(':').map(|(_, p)| p).unwrap_or_default();
    let kill = fx.url("/admin/actors/root/alpha/kill");

    // A cross-site POST from the operator's browser names its page's origin.
    let response = fx
        .http
        .post(&kill)
        .header("origin", "https://evil.example")
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body: Value = response.json().await?;
    assert_eq!(error_code(&body), "forbidden_origin", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("\"https://evil.example\""), "{message}");
    // A page whose own name resolves to 127.0.0.1 (DNS rebinding) agrees with the Host
    // header, but a tokenless endpoint serves only loopback names.
    let response = fx
        .http
        .post(&kill)
        .header("host", format!("evil.example:{port}"))
        .header("origin", format!("http://evil.example:{port}"))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    // Its GETs carry no Origin: the Host alone is refused.
    let response = fx
        .http
        .get(format!("{}/admin/config", fx.base))
        .header("host", format!("evil.example:{port}"))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body: Value = response.json().await?;
    assert_eq!(error_code(&body), "forbidden_host", "{body}");
    let tree = fx.wait_tree(None, "alpha untouched", |_| true).await?;
    let alpha = child(&tree, "root/alpha").context("alpha")?;
    assert_eq!((alpha.generation, alpha.restarts_total), (1, 0));

    // Its own origin (a page the endpoint served) and no origin (curl, the CLI) pass.
    let response = fx
        .http
        .post(&kill)
        .header("origin", fx.base.as_str())
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    fx.wait_tree(None, "alpha restarted after a same-origin kill", |t| {
        child(t, "root/alpha").is_some_and(|a| a.generation == 2)
    })
    .await?;
    let (status, body) = fx.post("/admin/actors/root/alpha/restart", None).await?;
    assert_eq!(status, StatusCode::OK, "{body}");

    fx.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_restarts() -> anyhow::Result<()> {
    let fx = Fixture::start(None, true).await?;
    fx.wait_status("/readyz", StatusCode::OK).await?;
    let (status, body) = fx.post("/admin/actors/root/group/beta/kill", None).await?;
    assert_eq!(status, StatusCode::OK, "{body}");

    let text = eventually(DEADLINE, "warden_restarts_total", async || {
        let response = fx
            .http
            .get(fx.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(response.status(), StatusCode::OK);
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        let text = response.text().await.expect("the metrics");
        if text
            .lines()
            .any(|l| l.starts_with("warden_restarts_total{"))
        {
            Ok(text)
        } else {
            Err(text)
        }
    })
    .await;
    assert!(
        text.contains("# TYPE warden_restarts_total counter"),
        "{text}"
    );
    assert!(text.contains("# HELP warden_restarts_total"), "{text}");

    // scripts/test.sh installs promtool and sets PROMTOOL; under CI a missing one is a
    // failure, never a skip.
    if let Some(promtool) = support::promtool()? {
        support::promtool_check(&promtool, "the admin endpoint", &text).await?;
    }

    fx.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_the_tree_is_handed_over() -> anyhow::Result<()> {
    let state = AdminState::new(json!({}), None, None);
    let fx = Fixture::start_unset(state, &loopback_any_port()).await?;

    let (status, health) = fx.get_json("/healthz", None).await?;
    assert_eq!(
        (status, health["status"].as_str()),
        (StatusCode::OK, Some("starting")),
        "{health}"
    );
    let (status, ready) = fx.get_json("/readyz", None).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready, json!({ "status": "not_ready", "failing": ["root"] }));
    fx.expect_error(
        Req::Get,
        "/admin/tree",
        None,
        StatusCode::SERVICE_UNAVAILABLE,
        "starting",
    )
    .await?;
    fx.expect_error(
        Req::Post,
        "/admin/actors/root/alpha/restart",
        None,
        StatusCode::SERVICE_UNAVAILABLE,
        "starting",
    )
    .await?;
    let (status, _) = fx.get("/admin/config", None).await?;
    assert_eq!(status, StatusCode::OK);

    fx.set_tree()?;
    fx.wait_status("/readyz", StatusCode::OK).await?;
    fx.shutdown().await
}

/// A tree `root → { alpha, admin }` with the admin endpoint on `bind` (no token, no
/// metrics, the tree not handed over); returns it with the endpoint's state.
async fn alpha_and_admin_on(bind: SocketAddr) -> anyhow::Result<(Tree, AdminState)> {
    let settings = AdminSettings {
        bind,
        ..AdminSettings::default()
    };
    let state = AdminState::new(json!({}), None, None);
    let children = vec![
        worker("alpha"),
        admin::spec(&settings, state.clone(), fast_policy()),
    ];
    Ok((Tree::start(children, TreeOptions::default()).await?, state))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_is_retried_until_free() -> anyhow::Result<()> {
    let blocker = std::net::TcpListener::bind("127.0.0.1:0")?;
    let taken = blocker.local_addr()?;
    let (tree, state) = alpha_and_admin_on(taken).await?;
    let handle = tree.handle();

    let failure = eventually(DEADLINE, "a bind failure recorded", async || {
        let snapshot = handle.snapshot();
        let failure = child(&snapshot, "root/admin").and_then(|a| a.last_failure.clone());
        failure.ok_or_else(|| snapshot.render_text())
    })
    .await;
    assert_eq!(failure.class, "transient");
    let want = format!("cannot bind the admin endpoint on {taken}: ");
    assert!(failure.reason.starts_with(&want), "{}", failure.reason);
    assert_eq!(state.bound_addr(), None);

    drop(blocker);
    let addr = tokio::time::timeout(DEADLINE, state.wait_bound())
        .await
        .context("never bound")?;
    assert_eq!(addr, taken);
    admin::check_health(&format!("http://{addr}")).await?;
    let report = tree.shutdown(DEADLINE).await;
    ensure!(report.graceful, "{report:?}");
    assert_eq!(state.bound_addr(), None);
    Ok(())
}

/// Polls `check_health` until it succeeds, or fails with the last error.
async fn wait_healthy(base: &str) -> anyhow::Result<()> {
    let healthy = format!("{base} healthy");
    eventually(DEADLINE, healthy, async || admin::check_health(base).await).await;
    Ok(())
}

/// The attack of the review on the admin endpoint: more keep-alive `GET /healthz`
/// connections from 127.0.0.1 than its cap, all kept open on the client's side. Without
/// keep-alive the server closes each after its answer, so none keeps a place and
/// `warden health` (`check_health`) gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_healthz_sockets_do_not_lock_out_warden_health() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SOCKETS: usize = 300;
    let fx = Fixture::start(None, false).await?;
    let addr = fx.base.trim_start_matches("http://").to_string();
    let mut attack = Vec::new();
    for _ in 0..SOCKETS {
        let mut stream = tokio::net::TcpStream::connect(&addr).await?;
        let _ = stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await;
        attack.push(stream);
    }
    let (mut served, mut refused, mut reset) = (0, 0, 0);
    for stream in &mut attack {
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
            .await
            .context("the server kept a keep-alive /healthz connection open")?;
        let answer = String::from_utf8_lossy(&answer);
        if answer.is_empty() {
            reset += 1;
        } else if answer.starts_with("HTTP/1.1 200 ") {
            ensure!(
                answer
                    .to_ascii_lowercase()
                    .contains("\r\nconnection: close\r\n"),
                "{answer}"
            );
            served += 1;
        } else {
            ensure!(answer.contains("too_many_connections"), "{answer}");
            refused += 1;
        }
    }
    eprintln!(
        "{SOCKETS} keep-alive /healthz connections: {served} served and closed, {refused} \
         refused with 503, {reset} reset"
    );
    ensure!(served >= 1, "none served");
    assert_eq!(served + refused + reset, SOCKETS);
    // The attacker still holds its 300 sockets; their places are free.
    wait_healthy(&fx.base).await?;
    admin::check_health(&fx.base).await?;
    drop(attack);
    fx.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_actor_comes_back_on_its_port_after_a_restart_and_a_kill() -> anyhow::Result<()> {
    // A fixed port: a restart must free it (graceful stop), and so must a kill (no
    // `post_stop`; the actor's state aborts its server task when dropped).
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let (tree, state) = alpha_and_admin_on(port).await?;
    let handle = tree.handle();
    let _ = state.set_tree(handle.clone());
    let base = format!("http://{port}");
    assert_eq!(
        tokio::time::timeout(DEADLINE, state.wait_bound()).await?,
        port
    );
    wait_healthy(&base).await?;

    handle.control("root/admin", ControlAction::Restart).await?;
    wait_healthy(&base).await?;
    handle.control("root/admin", ControlAction::Kill).await?;
    eventually(DEADLINE, "the admin actor comes back", async || {
        let snapshot = handle.snapshot();
        let admin = child(&snapshot, "root/admin").expect("an admin node");
        if admin.state == NodeState::Running && admin.restarts_total >= 1 && admin.generation >= 3 {
            Ok(())
        } else {
            Err(snapshot.render_text())
        }
    })
    .await;
    wait_healthy(&base).await?;
    assert_eq!(state.bound_addr(), Some(port));

    let report = tree.shutdown(DEADLINE).await;
    ensure!(report.graceful, "{report:?}");
    assert_eq!(state.bound_addr(), None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_bind_without_token_is_fatal() -> anyhow::Result<()> {
    let settings = AdminSettings {
        bind: ([0, 0, 0, 0], 0).into(),
        ..AdminSettings::default()
    };
    let state = AdminState::new(json!({}), None, None);
    let tree = Tree::start(
        vec![admin::spec(&settings, state.clone(), fast_policy())],
        TreeOptions::default(),
    )
    .await?;
    let handle = tree.handle();
    let admin = eventually(DEADLINE, "the admin child is parked", async || {
        let snapshot = handle.snapshot();
        match child(&snapshot, "root/admin") {
            Some(admin) if admin.state == NodeState::Parked => Ok(admin.clone()),
            _ => Err(snapshot.render_text()),
        }
    })
    .await;
    let failure = admin
        .last_failure
        .clone()
        .context("parked without a failure")?;
    assert_eq!(failure.class, "fatal");
    assert!(
        failure.reason.contains("without admin.token"),
        "{}",
        failure.reason
    );
    assert_eq!(state.bound_addr(), None);
    let report = tree.shutdown(DEADLINE).await;
    ensure!(report.graceful, "{report:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_names_the_url_and_cause() -> anyhow::Result<()> {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let base = format!("http://{closed}");
    match admin::check_health(&base).await {
        Err(err @ ClientError::Unreachable { .. }) => {
            let text = err.to_string();
            assert!(
                text.starts_with(&format!("cannot reach {base}/healthz: ")),
                "{text}"
            );
            assert!(text.to_lowercase().contains("refused"), "{text}");
        }
        other => bail!("expected a refused connection, got {other:?}"),
    }
    Ok(())
}
