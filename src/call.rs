//! `warden call METHOD`: one request to the gateway, retried only when that is safe.
//!
//! A call that could not be *delivered* — connection refused or reset before the upgrade,
//! HTTP 503, closed by the gateway before `hello-ok` (1012 restart, 1013 starting …) — is
//! tried again after [`RETRY_DELAYS`] (150, 350, 750, 1500 ms; a larger `retry_after_ms`
//! or `Retry-After` from the server wins), five attempts in all, then fails naming the
//! last cause. Once the request has been written, a lost connection is retried the same
//! way only for an idempotent method ([`is_idempotent`]); any other method is reported as
//! possibly delivered and never sent again. A gateway's error answer is never retried,
//! except `account_not_ready` (a Matrix account still starting: nothing was done) and, for
//! an idempotent method, `busy`.
//!
//! This is the guard against the restart race (DESIGN.md, failure 2): a call made while
//! the gateway restarts waits for it instead of failing with a bare close code.

use std::ops::ControlFlow;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use warden_actors::gateway::client::{CallError, ConnectError, ConnectOptions, GatewayClient};
use warden_actors::gateway::protocol::code::{ACCOUNT_NOT_READY, BUSY};
use warden_actors::gateway::protocol::{ClientInfo, Role};

/// The waits between attempts; their number plus one is the number of attempts.
pub const RETRY_DELAYS: [Duration; 4] = [
    Duration::from_millis(150),
    Duration::from_millis(350),
    Duration::from_millis(750),
    Duration::from_millis(1500),
];

/// Attempts in all: the first and one after each delay.
pub const ATTEMPTS: usize = RETRY_DELAYS.len() + 1;

/// The longest handshake one attempt may take (the gateway's own default).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether sending `method` with `params` twice has the same effect as sending it once, so
/// a request that may have been delivered can be sent again. The one place that decides
/// it: the read-only methods, `chat.ack` (a consumer never moves back), `chat.typing` (a
/// notice set again) and `chat.send` with a `txn_id` (the gateway answers a repeated one
/// with the first `event_id`); `nodes.invoke`, `chat.send` without `txn_id`, `chat.react`,
/// `chat.edit`, `approvals.request`, `approvals.resolve` and every method not listed here
/// are sent at most once.
pub fn is_idempotent(method: &str, params: &Value) -> bool {
    match method {
        "health" | "status" | "tree" | "nodes.list" | "approvals.list" | "inbox.stats"
        | "chat.ack" | "chat.typing" => true,
        "chat.send" => params.get("txn_id").is_some_and(Value::is_string),
        _ => false,
    }
}

/// `params` as `warden call` sends them: a `chat.send` without a `txn_id` gets a new
/// random one, so that it can be retried like the read-only methods.
pub fn with_txn_id(method: &str, mut params: Value) -> Value {
    if method == "chat.send"
        && let Value::Object(map) = &mut params
        && !map.contains_key("txn_id")
    {
        let txn_id = format!("cli-{:032x}", rand::random::<u128>());
        map.insert("txn_id".to_string(), Value::String(txn_id));
    }
    params
}

/// Parses `--params`: a JSON object (default `{}`).
pub fn parse_params(text: Option<&str>) -> Result<Value, String> {
    let Some(text) = text else {
        return Ok(Value::Object(serde_json::Map::new()));
    };
    match serde_json::from_str::<Value>(text) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(other) => Err(format!(
            "--params must be a JSON object like '{{\"node\":\"x\"}}', got {other}"
        )),
        Err(e) => Err(format!("--params is not valid JSON: {e}")),
    }
}

/// What to call and where. `Debug` masks the token.
#[derive(Clone)]
pub struct CallRequest {
    /// The gateway's WebSocket URL, e.g. `ws://127.0.0.1:18789/ws`.
    pub url: String,
    /// The gateway token (empty when none is configured).
    pub token: String,
    /// The method.
    pub method: String,
    /// Its params, a JSON object.
    pub params: Value,
    /// The whole call, retries included, must finish within this.
    pub timeout: Duration,
}

impl std::fmt::Debug for CallRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallRequest")
            .field("url", &self.url)
            .field("token", &"****")
            .field("method", &self.method)
            .field("params", &self.params)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Why `warden call` failed. Each names the cause and the URL in one line.
#[derive(Debug, thiserror::Error)]
pub enum CallFailure {
    /// The gateway answered with an error.
    #[error("{method} failed: {code}: {message}")]
    Failed {
        /// The method.
        method: String,
        /// The error code.
        code: String,
        /// The error message.
        message: String,
    },
    /// A connection failure that retrying will not fix (`unauthorized`, a bad URL …).
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The gateway URL.
        url: String,
        /// The cause.
        source: ConnectError,
    },
    /// Every attempt failed with a retryable cause, or the next wait would pass the
    /// deadline.
    #[error("gateway unreachable after {attempts} attempt{}: {last} ({url})",
        if *.attempts == 1 { "" } else { "s" })]
    Unreachable {
        /// Attempts made.
        attempts: usize,
        /// The last attempt's cause.
        last: String,
        /// The gateway URL.
        url: String,
    },
    /// The connection was lost after a non-idempotent request was written.
    #[error("{method}: {cause} ({url}); the request may have been delivered; not retrying")]
    MaybeDelivered {
        /// The method.
        method: String,
        /// How the connection was lost.
        cause: CallError,
        /// The gateway URL.
        url: String,
    },
    /// The gateway broke the protocol after `hello-ok`.
    #[error("{method}: {cause} ({url})")]
    Protocol {
        /// The method.
        method: String,
        /// What was wrong.
        cause: CallError,
        /// The gateway URL.
        url: String,
    },
    /// No answer within `--timeout`.
    #[error("no answer from {url} within {} ms{}", .after.as_millis(),
        if *.maybe_delivered { "; the request may have been delivered" } else { "" })]
    Timeout {
        /// The gateway URL.
        url: String,
        /// The timeout.
        after: Duration,
        /// Whether the request had been written when time ran out.
        maybe_delivered: bool,
    },
}

/// Calls `request.method` on the gateway with the retry policy of this module. `log`
/// receives one line per retry (attempt, cause, delay).
pub async fn call(request: &CallRequest, log: impl FnMut(&str)) -> Result<Value, CallFailure> {
    let mut options = ConnectOptions::new(
        Role::Operator,
        request.token.clone(),
        ClientInfo {
            name: "warden-cli".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        },
    );
    options.handshake_timeout = HANDSHAKE_TIMEOUT.min(request.timeout);
    let mut gateway = Gateway {
        url: &request.url,
        options,
    };
    with_retries(&mut gateway, request, log).await
}

/// One way of reaching a gateway: the real one, or a script in tests.
trait Connector {
    /// An open connection past `hello-ok`.
    type Conn;
    /// Opens a connection.
    async fn connect(&mut self) -> Result<Self::Conn, ConnectError>;
    /// Sends one request on `conn` and waits for its answer; then closes `conn`.
    async fn call(
        &mut self,
        conn: Self::Conn,
        method: &str,
        params: &Value,
    ) -> Result<Value, CallError>;
}

/// The real gateway, over [`GatewayClient`].
struct Gateway<'a> {
    url: &'a str,
    options: ConnectOptions,
}

impl Connector for Gateway<'_> {
    type Conn = GatewayClient;

    async fn connect(&mut self) -> Result<GatewayClient, ConnectError> {
        let (client, _hello) = GatewayClient::connect(self.url, self.options.clone()).await?;
        Ok(client)
    }

    async fn call(
        &mut self,
        mut conn: GatewayClient,
        method: &str,
        params: &Value,
    ) -> Result<Value, CallError> {
        let result = conn.call(method, params.clone()).await;
        conn.close().await;
        result
    }
}

/// What one attempt came to, when it may be retried.
struct Retry {
    /// For the log and the final error.
    cause: String,
    /// The server's hint, if larger than our own delay.
    hint: Option<Duration>,
}

/// The retry loop: at most [`ATTEMPTS`] attempts, each retryable failure followed by its
/// delay from [`RETRY_DELAYS`] (or the server's hint when larger), all within
/// `request.timeout`.
async fn with_retries<C: Connector>(
    connector: &mut C,
    request: &CallRequest,
    mut log: impl FnMut(&str),
) -> Result<Value, CallFailure> {
    let url = &request.url;
    let deadline = Instant::now() + request.timeout;
    for attempt in 1..=ATTEMPTS {
        let retry = match try_once(connector, request, deadline).await {
            ControlFlow::Break(outcome) => return outcome,
            ControlFlow::Continue(retry) => retry,
        };
        let Some(delay) = next_delay(attempt, &retry, deadline) else {
            return Err(CallFailure::Unreachable {
                attempts: attempt,
                last: retry.cause,
                url: url.clone(),
            });
        };
        log(&format!(
            "attempt {attempt} of {ATTEMPTS} failed: {} ({url}); retrying in {} ms",
            retry.cause,
            delay.as_millis()
        ));
        tokio::time::sleep(delay).await;
    }
    // Every path through the last attempt returns above.
    Err(CallFailure::Unreachable {
        attempts: ATTEMPTS,
        last: "no attempt made".to_string(),
        url: url.clone(),
    })
}

/// One attempt within `deadline`: connect, then call. Breaks with the outcome, or goes on
/// with why the attempt may be retried.
async fn try_once<C: Connector>(
    connector: &mut C,
    request: &CallRequest,
    deadline: Instant,
) -> ControlFlow<Result<Value, CallFailure>, Retry> {
    let timed_out = |maybe_delivered: bool| {
        ControlFlow::Break(Err(CallFailure::Timeout {
            url: request.url.clone(),
            after: request.timeout,
            maybe_delivered,
        }))
    };
    let conn = match tokio::time::timeout_at(deadline, connector.connect()).await {
        Err(_) => return timed_out(false),
        Ok(Err(e)) if e.is_retryable() => {
            return ControlFlow::Continue(Retry {
                cause: e.to_string(),
                hint: e.retry_after(),
            });
        }
        Ok(Err(source)) => {
            return ControlFlow::Break(Err(CallFailure::Connect {
                url: request.url.clone(),
                source,
            }));
        }
        Ok(Ok(conn)) => conn,
    };
    let sent = connector.call(conn, &request.method, &request.params);
    match tokio::time::timeout_at(deadline, sent).await {
        Err(_) => timed_out(true),
        Ok(Ok(value)) => ControlFlow::Break(Ok(value)),
        Ok(Err(error)) => after_call_error(error, request),
    }
}

/// A call that failed once connected: retried when it was not sent, or when the
/// connection was lost on an idempotent method; anything else is the outcome.
fn after_call_error(
    error: CallError,
    request: &CallRequest,
) -> ControlFlow<Result<Value, CallFailure>, Retry> {
    let CallRequest { url, method, .. } = request;
    let failure = match error {
        // The account is starting (right after a restart, before its first sync): nothing
        // was done, so any method may be tried again.
        // `busy` on an idempotent call (a send with the same txn_id still finishing, a cap
        // reached): the same request later is safe.
        CallError::Failed { code, message }
            if code == ACCOUNT_NOT_READY
                || (code == BUSY && is_idempotent(method, &request.params)) =>
        {
            return ControlFlow::Continue(Retry {
                cause: format!("{code}: {message}"),
                hint: None,
            });
        }
        CallError::Failed { code, message } => CallFailure::Failed {
            method: method.clone(),
            code,
            message,
        },
        e @ CallError::NotSent(_) => {
            return ControlFlow::Continue(Retry {
                cause: e.to_string(),
                hint: None,
            });
        }
        e if e.is_connection_lost() && is_idempotent(method, &request.params) => {
            return ControlFlow::Continue(Retry {
                cause: e.to_string(),
                hint: e.retry_after(),
            });
        }
        cause if cause.is_connection_lost() => CallFailure::MaybeDelivered {
            method: method.clone(),
            cause,
            url: url.clone(),
        },
        cause => CallFailure::Protocol {
            method: method.clone(),
            cause,
            url: url.clone(),
        },
    };
    ControlFlow::Break(Err(failure))
}

/// The delay after failed attempt `attempt`: its entry of [`RETRY_DELAYS`], or the
/// server's hint when larger. `None` when no attempt is left, or the next would start past
/// `deadline`.
fn next_delay(attempt: usize, retry: &Retry, deadline: Instant) -> Option<Duration> {
    let base = *RETRY_DELAYS.get(attempt - 1)?;
    let delay = retry.hint.map_or(base, |hint| hint.max(base));
    (Instant::now() + delay < deadline).then_some(delay)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::io;

    use serde_json::json;

    use super::*;

    /// One scripted attempt.
    enum Step {
        /// `connect` fails.
        Refuse(ConnectError),
        /// `connect` succeeds; the call ends so.
        Answer(Result<Value, CallError>),
    }

    /// Plays a script of attempts and records when each connect happened and what was sent.
    struct Script {
        steps: VecDeque<Step>,
        start: Instant,
        connects_at: Vec<Duration>,
        sent: Vec<String>,
    }

    impl Script {
        fn new(steps: Vec<Step>) -> Self {
            Self {
                steps: steps.into(),
                start: Instant::now(),
                connects_at: Vec::new(),
                sent: Vec::new(),
            }
        }
    }

    impl Connector for Script {
        type Conn = Result<Value, CallError>;

        async fn connect(&mut self) -> Result<Self::Conn, ConnectError> {
            self.connects_at.push(self.start.elapsed());
            match self.steps.pop_front().expect("a step per attempt") {
                Step::Refuse(e) => Err(e),
                Step::Answer(outcome) => Ok(outcome),
            }
        }

        async fn call(
            &mut self,
            conn: Self::Conn,
            method: &str,
            _params: &Value,
        ) -> Result<Value, CallError> {
            self.sent.push(method.to_string());
            conn
        }
    }

    fn request(method: &str) -> CallRequest {
        CallRequest {
            url: "ws://127.0.0.1:18789/ws".to_string(),
            token: String::new(),
            method: method.to_string(),
            params: json!({}),
            timeout: Duration::from_secs(30),
        }
    }

    fn refused() -> Step {
        Step::Refuse(ConnectError::Refused(io::ErrorKind::ConnectionRefused))
    }

    fn closed(code: u16, retry_after_ms: Option<u64>) -> Step {
        Step::Refuse(ConnectError::Closed {
            code,
            reason: String::new(),
            retry_after_ms,
        })
    }

    fn ms(list: &[u64]) -> Vec<Duration> {
        list.iter().copied().map(Duration::from_millis).collect()
    }

    async fn run(script: &mut Script, method: &str) -> (Result<Value, CallFailure>, Vec<String>) {
        let mut lines = Vec::new();
        let result = with_retries(script, &request(method), |l| lines.push(l.to_string())).await;
        (result, lines)
    }

    #[tokio::test(start_paused = true)]
    async fn undelivered_calls_are_retried_after_150_350_750_1500_ms() {
        let mut script = Script::new(vec![
            refused(),
            closed(1012, None),
            refused(),
            closed(1006, None),
            Step::Answer(Ok(json!({"status": "ok"}))),
        ]);
        let (result, lines) = run(&mut script, "health").await;
        assert_eq!(result.expect("answered"), json!({"status": "ok"}));
        assert_eq!(script.connects_at, ms(&[0, 150, 500, 1250, 2750]));
        assert_eq!(script.sent, ["health"]);
        assert_eq!(lines.len(), 4);
        assert_eq!(
            lines[0],
            "attempt 1 of 5 failed: connection refused (ws://127.0.0.1:18789/ws); retrying in 150 ms"
        );
        assert!(lines[1].contains("(1012)") && lines[1].ends_with("retrying in 350 ms"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_larger_server_hint_wins_a_smaller_one_does_not() {
        let mut script = Script::new(vec![
            closed(1013, Some(1000)),
            Step::Refuse(ConnectError::Busy {
                retry_after_ms: Some(100),
            }),
            Step::Answer(Ok(json!(1))),
        ]);
        let (result, lines) = run(&mut script, "status").await;
        assert_eq!(result.expect("answered"), json!(1));
        assert_eq!(script.connects_at, ms(&[0, 1000, 1350]));
        assert!(lines[0].ends_with("retrying in 1000 ms"), "{lines:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_five_attempts_naming_the_last_cause() {
        let mut script = Script::new((0..5).map(|_| refused()).collect());
        let (result, lines) = run(&mut script, "health").await;
        let err = result.expect_err("unreachable");
        assert_eq!(
            err.to_string(),
            "gateway unreachable after 5 attempts: connection refused (ws://127.0.0.1:18789/ws)"
        );
        assert_eq!(lines.len(), 4);
        assert_eq!(script.connects_at, ms(&[0, 150, 500, 1250, 2750]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_non_idempotent_request_is_never_sent_twice() {
        for method in ["nodes.invoke", "chat.send", "approvals.resolve", "frob"] {
            let lost = CallError::Closed {
                code: 1012,
                reason: "service restart".into(),
                retry_after_ms: Some(500),
            };
            let mut script = Script::new(vec![Step::Answer(Err(lost))]);
            let (result, lines) = run(&mut script, method).await;
            let err = result.expect_err("lost");
            assert_eq!(
                err.to_string(),
                format!(
                    "{method}: gateway closed the connection (1012): service restart \
                     (ws://127.0.0.1:18789/ws); the request may have been delivered; not retrying"
                )
            );
            assert_eq!(script.sent, [method]);
            assert!(lines.is_empty());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idempotent_requests_are_retried_after_a_loss_and_unsent_ones_always() {
        let lost = CallError::Lost("connection reset".into());
        let mut script = Script::new(vec![Step::Answer(Err(lost)), Step::Answer(Ok(json!([])))]);
        let (result, _) = run(&mut script, "nodes.list").await;
        assert_eq!(result.expect("answered"), json!([]));
        assert_eq!(script.sent, ["nodes.list", "nodes.list"]);

        let unsent = CallError::NotSent("already closed".into());
        let mut script = Script::new(vec![
            Step::Answer(Err(unsent)),
            Step::Answer(Ok(json!("sent"))),
        ]);
        let (result, _) = run(&mut script, "chat.send").await;
        assert_eq!(result.expect("answered"), json!("sent"));
        assert_eq!(script.connects_at, ms(&[0, 150]));
    }

    #[tokio::test(start_paused = true)]
    async fn errors_that_retrying_cannot_fix_fail_at_once() {
        let rejected = ConnectError::Rejected {
            code: "unauthorized".into(),
            message: "bad token".into(),
        };
        let mut script = Script::new(vec![Step::Refuse(rejected)]);
        let (result, _) = run(&mut script, "health").await;
        assert_eq!(
            result.expect_err("rejected").to_string(),
            "cannot connect to ws://127.0.0.1:18789/ws: gateway rejected the connection: \
             unauthorized: bad token"
        );
        let mut script = Script::new(vec![closed(1008, None)]);
        assert!(matches!(
            run(&mut script, "health").await.0,
            Err(CallFailure::Connect { .. })
        ));

        let failed = CallError::Failed {
            code: "unknown_node".into(),
            message: "no node x".into(),
        };
        let mut script = Script::new(vec![Step::Answer(Err(failed))]);
        let (result, _) = run(&mut script, "health").await;
        assert_eq!(
            result.expect_err("failed").to_string(),
            "health failed: unknown_node: no node x"
        );
        assert_eq!(script.connects_at.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_that_would_pass_the_deadline_is_not_made() {
        let mut script = Script::new(vec![closed(1013, Some(60_000))]);
        let (result, lines) = run(&mut script, "health").await;
        let err = result.expect_err("too late");
        assert!(
            err.to_string()
                .starts_with("gateway unreachable after 1 attempt: gateway closed"),
            "{err}"
        );
        assert!(lines.is_empty());
    }

    #[test]
    fn params_must_be_an_object() {
        assert_eq!(parse_params(None), Ok(json!({})));
        assert_eq!(
            parse_params(Some(r#"{"node":"x"}"#)),
            Ok(json!({"node": "x"}))
        );
        assert!(parse_params(Some("[1]")).is_err_and(|e| e.contains("must be a JSON object")));
        assert!(parse_params(Some("{")).is_err_and(|e| e.contains("not valid JSON")));
    }

    #[test]
    fn only_read_only_methods_acks_and_sends_with_a_txn_id_are_idempotent() {
        let none = json!({});
        for m in [
            "health",
            "status",
            "tree",
            "nodes.list",
            "approvals.list",
            "inbox.stats",
            "chat.ack",
            "chat.typing",
        ] {
            assert!(is_idempotent(m, &none), "{m}");
        }
        for m in [
            "nodes.invoke",
            "chat.send",
            "chat.react",
            "chat.edit",
            "approvals.request",
            "approvals.resolve",
            "subscribe",
            "frob",
        ] {
            assert!(!is_idempotent(m, &none), "{m}");
        }
        assert!(is_idempotent("chat.send", &json!({ "txn_id": "t1" })));
    }

    #[test]
    fn a_chat_send_gets_a_fresh_txn_id_unless_it_has_one() {
        let params = json!({ "account": "a", "room_id": "!r:x", "body": "hi" });
        let one = with_txn_id("chat.send", params.clone());
        let two = with_txn_id("chat.send", params.clone());
        let (a, b) = (one["txn_id"].as_str(), two["txn_id"].as_str());
        assert!(
            a.is_some_and(|t| t.starts_with("cli-") && t.len() == 36),
            "{one}"
        );
        assert_ne!(a, b);
        let kept = with_txn_id("chat.send", json!({ "txn_id": "mine" }));
        assert_eq!(kept["txn_id"], "mine");
        assert_eq!(with_txn_id("nodes.list", json!({})), json!({}));
    }
}
