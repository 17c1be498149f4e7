//! The gateway client: one WebSocket connection that speaks protocol v1.
//!
//! Everything that talks to a gateway goes through [`GatewayClient`]: `warden call`, the
//! node host, approval handlers, tests and benchmarks. It does the handshake
//! (`connect.challenge` → `req connect` → `hello-ok`), matches answers to requests, and
//! keeps the events that arrive meanwhile for [`GatewayClient::next_event`].
//!
//! ```text
//! let (mut client, hello) = GatewayClient::connect(url, options).await?;
//! let health = client.call("health", json!({})).await?;
//! client.close().await;
//! ```
//!
//! ## Design
//! The client owns the socket and reads it inline, only while a caller awaits
//! [`GatewayClient::call`] or [`GatewayClient::next_event`]: it spawns no task, so dropping
//! it drops the connection. It does not reconnect either: a connection is one attempt, and
//! the caller's retry layer (the supervisor, or `warden call`'s fixed schedule) decides
//! whether to try again, guided by [`ConnectError::is_retryable`] and
//! [`ConnectError::retry_after`].
//!
//! ## TLS
//! A `wss://` URL is served by rustls with the aws-lc-rs crypto provider, named explicitly
//! (never a process-wide default, so no "no default provider" panic and no ambiguity if
//! another provider is ever compiled in), TLS 1.2 and 1.3. The server certificate is checked
//! against the system's CA roots, read with `rustls-native-certs`: `SSL_CERT_FILE` /
//! `SSL_CERT_DIR` when set (instead of the system store), else the platform store
//! (`/etc/ssl/certs` on Debian). The roots are read at the first `wss://` connect and kept
//! for the life of the process; if none can be read, the connect fails with
//! [`ConnectError::Tls`] saying so. No OpenSSL is involved.
//!
//! ## Failures
//! A failed connect is classified so a retry layer can act on it without parsing text:
//! refused / reset before the upgrade, HTTP 503 with `Retry-After`, closed by the server
//! before `hello-ok` (1012, 1013, 1008 …), rejected (`unauthorized`, at `connect` or by
//! a 401 to the credential the upgrade carries in `Authorization`), timed out, or a
//! protocol violation. After `hello-ok`, a [`CallError`] says whether the gateway answered
//! with an error or the connection was lost (and the request may have been delivered).
//! A connection silent for two tick intervals is closed with 4000 ([`CallError::Silent`]).

use std::collections::VecDeque;
use std::io;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::protocol::{
    self, ClientInfo, ConnectParams, ErrorBody, Frame, HelloOk, NodeInfo, PROTOCOL_VERSION, Role,
    ShutdownNotice, close,
};

/// The close code a client reports when the connection ended without a close frame
/// (RFC 6455 "abnormal closure"; never sent on the wire).
pub const ABNORMAL_CLOSURE: u16 = 1006;

/// How long [`GatewayClient::close`] waits for the server's close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How to connect: who we are and how long the handshake may take.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The role of this connection.
    pub role: Role,
    /// The gateway token.
    pub token: String,
    /// This program, e.g. `warden-cli 0.1.0`.
    pub client: ClientInfo,
    /// For role `node`: its name and commands.
    pub node: Option<NodeInfo>,
    /// For role `approver`: the Matrix account alias it serves.
    pub account: Option<String>,
    /// The whole handshake — TCP, WebSocket upgrade, challenge, `hello-ok` — must finish
    /// within this, else [`ConnectError::Timeout`]. Default 10 s (the server's own default).
    pub handshake_timeout: Duration,
}

impl ConnectOptions {
    /// Options for `role` with no node, no account and a 10 s handshake timeout.
    pub fn new(role: Role, token: impl Into<String>, client: ClientInfo) -> Self {
        Self {
            role,
            token: token.into(),
            client,
            node: None,
            account: None,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a connection could not be established. Drives retries: see
/// [`is_retryable`](Self::is_retryable) and [`retry_after`](Self::retry_after).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nobody accepted the TCP connection (`ECONNREFUSED`), or the connection was reset or
    /// closed before the WebSocket upgrade. The kind says which.
    #[error("{}", refused_text(*.0))]
    Refused(io::ErrorKind),
    /// HTTP 503 before the upgrade: too many handshaking sockets. `retry_after_ms` is the
    /// `Retry-After` header, when given in seconds.
    #[error("gateway busy (HTTP 503{})", retry_after_text(*retry_after_ms))]
    Busy {
        /// The server's `Retry-After`, in ms.
        retry_after_ms: Option<u64>,
    },
    /// Any other HTTP answer instead of the upgrade (404, 501 …): not a v1 gateway there.
    #[error("the server answered HTTP {status} instead of upgrading to WebSocket")]
    Http {
        /// The HTTP status.
        status: u16,
    },
    /// The server closed the socket before `hello-ok`: 1012 (restart), 1013 (starting),
    /// 1001, 1008, 4408 …, or [`ABNORMAL_CLOSURE`] when the connection simply ended.
    #[error(
        "gateway closed the connection before hello ({code}): {}",
        reason_text(reason)
    )]
    Closed {
        /// The close code.
        code: u16,
        /// The close reason.
        reason: String,
        /// The server's hint: `retry_after_ms` of a 1013 reason, or `expected_back_ms` of a
        /// `shutdown` event received during the handshake.
        retry_after_ms: Option<u64>,
    },
    /// The server answered `connect` with an error (`unauthorized`, `bad_request` …), or
    /// refused the credential the upgrade carried (HTTP 401, `unauthorized`).
    #[error("gateway rejected the connection: {code}: {message}")]
    Rejected {
        /// The error code.
        code: String,
        /// The error message.
        message: String,
    },
    /// The handshake did not finish within [`ConnectOptions::handshake_timeout`].
    #[error("no hello from the gateway within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The URL cannot be used (bad syntax, not `ws://`/`wss://`).
    #[error("bad gateway URL: {0}")]
    Url(String),
    /// The TLS handshake of a `wss://` URL failed (an untrusted or mismatched certificate,
    /// a server that does not speak TLS …), or no CA roots could be read to check it.
    #[error("TLS: {0}")]
    Tls(String),
    /// Another network error (unreachable host, unknown name …).
    #[error("network error: {0}")]
    Io(io::Error),
    /// The server did not follow the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ConnectError {
    /// Whether trying again may succeed: the server was down, restarting, starting or
    /// busy, or closed the socket before `hello-ok` for a reason other than policy.
    /// A rejection (`unauthorized`, 1008), a bad URL, a protocol error, a non-503 HTTP
    /// answer, a handshake timeout (do not feed a handshake storm) and other network
    /// errors are not retryable.
    pub fn is_retryable(&self) -> bool {
        match self {
            ConnectError::Refused(_) | ConnectError::Busy { .. } => true,
            // 1001: the server is stopping for good; a quick retry will not find it.
            ConnectError::Closed { code, .. } => !matches!(
                *code,
                close::POLICY | close::INVALID_FRAME | close::TOO_BIG | close::GOING_AWAY
            ),
            ConnectError::Http { .. }
            | ConnectError::Rejected { .. }
            | ConnectError::Timeout(_)
            | ConnectError::Url(_)
            | ConnectError::Tls(_)
            | ConnectError::Io(_)
            | ConnectError::Protocol(_) => false,
        }
    }

    /// The server's hint of when to try again, if it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ConnectError::Busy { retry_after_ms } | ConnectError::Closed { retry_after_ms, .. } => {
                retry_after_ms.map(Duration::from_millis)
            }
            _ => None,
        }
    }

    fn from_ws(err: tungstenite::Error) -> Self {
        use tungstenite::error::ProtocolError;
        match err {
            tungstenite::Error::Io(e) if tls::is_handshake_error(&e) => {
                ConnectError::Tls(tls::handshake_text(&e))
            }
            tungstenite::Error::Tls(e) => ConnectError::Tls(e.to_string()),
            tungstenite::Error::Io(e) => match e.kind() {
                io::ErrorKind::ConnectionRefused
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof => ConnectError::Refused(e.kind()),
                _ => ConnectError::Io(e),
            },
            // The server closed the TCP connection without answering the upgrade.
            tungstenite::Error::Protocol(ProtocolError::HandshakeIncomplete) => {
                ConnectError::Refused(io::ErrorKind::UnexpectedEof)
            }
            tungstenite::Error::Http(response) if response.status().as_u16() == 503 => {
                let retry_after_ms = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|secs| secs.saturating_mul(1000));
                ConnectError::Busy { retry_after_ms }
            }
            // The credential on the upgrade was refused: the same rejection as a refused
            // `connect`, with the server's code and message.
            tungstenite::Error::Http(response) if response.status().as_u16() == 401 => {
                let body = response.body().as_deref().unwrap_or_default();
                #[derive(serde::Deserialize)]
                struct Refusal {
                    error: ErrorBody,
                }
                let ErrorBody { code, message } = serde_json::from_slice::<Refusal>(body)
                    .map(|r| r.error)
                    .unwrap_or_else(|_| ErrorBody {
                        code: protocol::code::UNAUTHORIZED.to_string(),
                        message: "HTTP 401 on the WebSocket upgrade".to_string(),
                    });
                ConnectError::Rejected { code, message }
            }
            tungstenite::Error::Http(response) => ConnectError::Http {
                status: response.status().as_u16(),
            },
            tungstenite::Error::Url(e) => ConnectError::Url(e.to_string()),
            tungstenite::Error::HttpFormat(e) => ConnectError::Url(e.to_string()),
            other => ConnectError::Protocol(other.to_string()),
        }
    }
}

fn refused_text(kind: io::ErrorKind) -> String {
    match kind {
        io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
        io::ErrorKind::UnexpectedEof => {
            "connection closed before the WebSocket upgrade".to_string()
        }
        kind => format!("connection lost before the WebSocket upgrade ({kind})"),
    }
}

fn retry_after_text(retry_after_ms: Option<u64>) -> String {
    retry_after_ms.map_or(String::new(), |ms| format!(", retry after {ms} ms"))
}

fn reason_text(reason: &str) -> &str {
    if reason.is_empty() {
        "no close reason"
    } else {
        reason
    }
}

/// Why a request got no successful answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The gateway answered with an error.
    #[error("{code}: {message}")]
    Failed {
        /// The error code, e.g. `unknown_node`.
        code: String,
        /// The error message.
        message: String,
    },
    /// The request could not be written: nothing was sent (the connection was already
    /// closed). Safe to send again on a new connection.
    #[error("request not sent: {0}")]
    NotSent(String),
    /// The connection closed after the request was written: it may have been delivered.
    #[error("gateway closed the connection ({code}): {}", reason_text(reason))]
    Closed {
        /// The close code, or [`ABNORMAL_CLOSURE`] when the connection simply ended.
        code: u16,
        /// The close reason.
        reason: String,
        /// The server's hint: `retry_after_ms` of a 1013 reason, or `expected_back_ms` of
        /// the `shutdown` event that preceded a 1012.
        retry_after_ms: Option<u64>,
    },
    /// The connection failed (reset, broken pipe) after the request was written: it may
    /// have been delivered.
    #[error("connection lost: {0}")]
    Lost(String),
    /// No frame for two tick intervals; the client closed the socket with 4000.
    #[error("no frame from the gateway for {} ms", .0.as_millis())]
    Silent(Duration),
    /// The gateway sent something that is not a frame of the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl CallError {
    /// Whether the connection is gone and the request may have reached the gateway: only a
    /// retry layer that knows the request is idempotent may send it again.
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            CallError::Closed { .. } | CallError::Lost(_) | CallError::Silent(_)
        )
    }

    /// The server's hint of when to come back, for a connection closed with 1013 (or 1012
    /// after a `shutdown` event).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CallError::Closed { retry_after_ms, .. } => retry_after_ms.map(Duration::from_millis),
            _ => None,
        }
    }
}

/// Something the gateway sent that is not the answer to one of our requests.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// An event (`tick`, `shutdown`, `chat.message` …).
    Event {
        /// Its name.
        event: String,
        /// Its data.
        payload: Value,
    },
    /// A request from the gateway (e.g. to a node); answer it with
    /// [`GatewayClient::respond`].
    Request {
        /// Echo it in the answer.
        id: String,
        /// The method.
        method: String,
        /// Its parameters.
        params: Value,
    },
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One connection to a gateway, past `hello-ok`.
#[derive(Debug)]
pub struct GatewayClient {
    /// The socket; read only inside `call`/`next_event`.
    ws: Socket,
    /// The last request id used; ids are `1`, `2`, … per connection (`connect` is `1`).
    last_id: u64,
    /// Events and server requests read while waiting for an answer, oldest first.
    pending: VecDeque<Incoming>,
    /// Set once the connection is over; every later read returns it again.
    ended: Option<CallError>,
    /// When the last frame (of any kind, pings too) arrived.
    last_frame: Instant,
    /// Two tick intervals: no frame for this long means the connection is dead.
    silence_limit: Option<Duration>,
    /// The `expected_back_ms` of a `shutdown` event, if one arrived.
    expected_back_ms: Option<u64>,
}

impl GatewayClient {
    /// Connects to `url` (`ws://host:port/ws`) and completes the handshake.
    pub async fn connect(
        url: &str,
        options: ConnectOptions,
    ) -> Result<(GatewayClient, HelloOk), ConnectError> {
        let limit = options.handshake_timeout;
        match tokio::time::timeout(limit, Self::handshake(url, options)).await {
            Ok(result) => result,
            Err(_) => Err(ConnectError::Timeout(limit)),
        }
    }

    /// The handshake: the upgrade, the challenge, `connect`, `hello-ok`.
    async fn handshake(
        url: &str,
        options: ConnectOptions,
    ) -> Result<(GatewayClient, HelloOk), ConnectError> {
        let mut client = Self::upgrade(url, &options.token).await?;
        client.await_challenge().await?;
        let id = client.send_connect(options).await?;
        let hello = client.await_hello(&id).await?;
        let tick = hello.policy.tick_interval_ms;
        client.silence_limit = (tick > 0).then(|| Duration::from_millis(tick.saturating_mul(2)));
        client.last_frame = Instant::now();
        Ok((client, hello))
    }

    /// Opens the WebSocket to `url`, showing `token` on the upgrade.
    async fn upgrade(url: &str, token: &str) -> Result<GatewayClient, ConnectError> {
        // A small read buffer, as on the server: the 128 KiB default stays resident per
        // connection, which adds up for a process holding many (benchmarks, hosts of
        // many approval handlers).
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(4 * 1024);
        // The credential goes on the upgrade too: a gateway that knows it admits the
        // upgrade outside the per-address budget of unauthenticated sockets (and refuses a
        // wrong one with 401 before upgrading). `connect` still carries it.
        let mut request = url.into_client_request().map_err(ConnectError::from_ws)?;
        if !token.is_empty()
            && let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}"))
        {
            request.headers_mut().insert(AUTHORIZATION, value);
        }
        let connector = tls::connector(url)?;
        let (ws, _response) = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(config),
            false,
            connector,
        )
        .await
        .map_err(ConnectError::from_ws)?;
        Ok(GatewayClient {
            ws,
            last_id: 0,
            pending: VecDeque::new(),
            ended: None,
            last_frame: Instant::now(),
            silence_limit: None,
            expected_back_ms: None,
        })
    }

    /// Reads up to the `connect.challenge` event (a `shutdown` event may come first, or
    /// instead of it); events before it are kept.
    async fn await_challenge(&mut self) -> Result<(), ConnectError> {
        loop {
            match self.read_frame().await.map_err(|e| self.before_hello(e))? {
                Frame::Event { event, .. } if event == "connect.challenge" => return Ok(()),
                Frame::Event { event, payload } => self.keep(Incoming::Event { event, payload }),
                other => {
                    return Err(ConnectError::Protocol(format!(
                        "expected the connect.challenge event, got {}",
                        other.to_text()
                    )));
                }
            }
        }
    }

    /// Sends `connect` with `options`; returns its request id.
    async fn send_connect(&mut self, options: ConnectOptions) -> Result<String, ConnectError> {
        let params = ConnectParams {
            protocol: PROTOCOL_VERSION,
            role: options.role,
            token: options.token,
            client: options.client,
            node: options.node,
            account: options.account,
        };
        let params =
            serde_json::to_value(params).map_err(|e| ConnectError::Protocol(e.to_string()))?;
        let id = self.next_id();
        let req = Frame::Req {
            id: id.clone(),
            method: "connect".to_string(),
            params,
        };
        self.write(&req).await.map_err(|e| self.before_hello(e))?;
        Ok(id)
    }

    /// Reads up to the answer to `connect` (request `id`): `hello-ok`, or the gateway's
    /// refusal; events before it are kept.
    async fn await_hello(&mut self, id: &str) -> Result<HelloOk, ConnectError> {
        let (ok, payload, error) = loop {
            match self.read_frame().await.map_err(|e| self.before_hello(e))? {
                Frame::Res {
                    id: rid,
                    ok,
                    payload,
                    error,
                } if rid == id => {
                    break (ok, payload, error);
                }
                Frame::Event { event, payload } => self.keep(Incoming::Event { event, payload }),
                other => {
                    return Err(ConnectError::Protocol(format!(
                        "expected the answer to connect, got {}",
                        other.to_text()
                    )));
                }
            }
        };
        if !ok {
            let ErrorBody { code, message } = error.unwrap_or_else(|| ErrorBody {
                code: "unknown".to_string(),
                message: "connect failed without an error body".to_string(),
            });
            return Err(ConnectError::Rejected { code, message });
        }
        serde_json::from_value(payload.unwrap_or(Value::Null))
            .map_err(|e| ConnectError::Protocol(format!("bad hello-ok: {e}")))
    }

    /// Sends request `method` with `params` and waits for its answer. Events and server
    /// requests that arrive meanwhile are kept for [`next_event`](Self::next_event).
    ///
    /// There is no timeout here beyond the two-tick silence limit: wrap the call in
    /// `tokio::time::timeout` to bound it. Dropping the future is safe: the connection stays
    /// usable and the late answer is skipped as an answer to no open request.
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value, CallError> {
        let id = self.next_id();
        let req = Frame::Req {
            id: id.clone(),
            method: method.to_string(),
            params,
        };
        self.write(&req).await?;
        loop {
            match self.read_frame().await? {
                Frame::Res {
                    id: rid,
                    ok,
                    payload,
                    error,
                } if rid == id => {
                    return if ok {
                        Ok(payload.unwrap_or(Value::Null))
                    } else {
                        let ErrorBody { code, message } = error.unwrap_or_else(|| ErrorBody {
                            code: "unknown".to_string(),
                            message: format!("{method} failed without an error body"),
                        });
                        Err(CallError::Failed { code, message })
                    };
                }
                Frame::Res { id: rid, .. } => {
                    tracing::debug!(id = %rid, "Ignoring an answer to no open request.");
                }
                Frame::Event { event, payload } => self.keep(Incoming::Event { event, payload }),
                Frame::Req { id, method, params } => {
                    self.keep(Incoming::Request { id, method, params });
                }
            }
        }
    }

    /// The next event or server request: the ones kept during calls first, then the
    /// socket's. Answers to no open request are skipped.
    pub async fn next_event(&mut self) -> Result<Incoming, CallError> {
        if let Some(incoming) = self.pending.pop_front() {
            return Ok(incoming);
        }
        loop {
            match self.read_frame().await? {
                Frame::Event { event, payload } => {
                    self.note_shutdown(&event, &payload);
                    return Ok(Incoming::Event { event, payload });
                }
                Frame::Req { id, method, params } => {
                    return Ok(Incoming::Request { id, method, params });
                }
                Frame::Res { id, .. } => {
                    tracing::debug!(%id, "Ignoring an answer to no open request.");
                }
            }
        }
    }

    /// Answers the server request `id`.
    pub async fn respond(
        &mut self,
        id: &str,
        result: Result<Value, ErrorBody>,
    ) -> Result<(), CallError> {
        let frame = match result {
            Ok(payload) => Frame::ok(id, payload),
            Err(ErrorBody { code, message }) => Frame::err(id, &code, message),
        };
        self.write(&frame).await
    }

    /// The `expected_back_ms` of the `shutdown` event, if the server announced a restart.
    pub fn expected_back_ms(&self) -> Option<u64> {
        self.expected_back_ms
    }

    /// Closes the connection (1000) and waits briefly for the server's close frame.
    /// Best effort: a connection that is already gone is simply dropped.
    pub async fn close(mut self) {
        if self.ended.is_some() {
            return;
        }
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        };
        if self.ws.close(Some(frame)).await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }

    fn next_id(&mut self) -> String {
        self.last_id += 1;
        self.last_id.to_string()
    }

    fn keep(&mut self, incoming: Incoming) {
        if let Incoming::Event { event, payload } = &incoming {
            self.note_shutdown(event, payload);
        }
        self.pending.push_back(incoming);
    }

    fn note_shutdown(&mut self, event: &str, payload: &Value) {
        if event == "shutdown"
            && let Ok(notice) = serde_json::from_value::<ShutdownNotice>(payload.clone())
        {
            self.expected_back_ms = Some(notice.expected_back_ms);
        }
    }

    /// Turns a read/write failure during the handshake into a [`ConnectError`].
    fn before_hello(&self, err: CallError) -> ConnectError {
        match err {
            CallError::Closed {
                code,
                reason,
                retry_after_ms,
            } => ConnectError::Closed {
                code,
                reason,
                retry_after_ms,
            },
            CallError::Lost(reason) | CallError::NotSent(reason) => ConnectError::Closed {
                code: ABNORMAL_CLOSURE,
                reason,
                retry_after_ms: None,
            },
            CallError::Protocol(text) => ConnectError::Protocol(text),
            other @ (CallError::Failed { .. } | CallError::Silent(_)) => {
                ConnectError::Protocol(other.to_string())
            }
        }
    }

    /// Writes one frame. A failure tungstenite reports before writing anything (the
    /// connection is already closing or closed) is [`CallError::NotSent`]; any other is
    /// [`CallError::Lost`]: part of the frame may have gone out.
    async fn write(&mut self, frame: &Frame) -> Result<(), CallError> {
        use tungstenite::error::ProtocolError;
        if let Some(ended) = &self.ended {
            return Err(CallError::NotSent(ended.to_string()));
        }
        let result = match self.ws.feed(Message::text(frame.to_text())).await {
            Ok(()) => self.ws.flush().await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => Ok(()),
            Err(
                e @ (tungstenite::Error::AlreadyClosed
                | tungstenite::Error::ConnectionClosed
                | tungstenite::Error::Protocol(ProtocolError::SendAfterClosing)),
            ) => Err(self.end(CallError::NotSent(e.to_string()))),
            Err(e) => Err(self.end(CallError::Lost(e.to_string()))),
        }
    }

    /// Reads the next protocol frame, answering pings on the way. Ends the connection on a
    /// close frame, a read error, silence past the limit, or a frame that is not protocol.
    async fn read_frame(&mut self) -> Result<Frame, CallError> {
        if let Some(ended) = &self.ended {
            return Err(ended.clone());
        }
        loop {
            let next = match self.silence_limit {
                Some(limit) => {
                    match tokio::time::timeout_at(self.last_frame + limit, self.ws.next()).await {
                        Ok(next) => next,
                        Err(_) => {
                            let frame = CloseFrame {
                                code: CloseCode::from(close::NO_TICK),
                                reason: "no frame for two tick intervals".into(),
                            };
                            let _ =
                                tokio::time::timeout(CLOSE_GRACE, self.ws.close(Some(frame))).await;
                            return Err(self.end(CallError::Silent(limit)));
                        }
                    }
                }
                None => self.ws.next().await,
            };
            let message = match next {
                None | Some(Err(tungstenite::Error::ConnectionClosed)) => {
                    let reason = "connection ended without a close frame";
                    return Err(self.closed(ABNORMAL_CLOSURE, reason.to_string()));
                }
                Some(Err(tungstenite::Error::Protocol(
                    tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                ))) => {
                    let reason = "connection reset without a close frame";
                    return Err(self.closed(ABNORMAL_CLOSURE, reason.to_string()));
                }
                Some(Err(e)) => return Err(self.end(CallError::Lost(e.to_string()))),
                Some(Ok(message)) => message,
            };
            self.last_frame = Instant::now();
            match message {
                Message::Text(text) => {
                    return Frame::parse(text.as_str())
                        .map_err(|e| self.end(CallError::Protocol(e.to_string())));
                }
                Message::Binary(_) => {
                    return Err(self.end(CallError::Protocol("binary frame".to_string())));
                }
                Message::Close(frame) => {
                    let (code, reason) = frame.map_or((ABNORMAL_CLOSURE, String::new()), |f| {
                        (u16::from(f.code), f.reason.to_string())
                    });
                    // Let tungstenite send its close reply; the socket is over either way.
                    let _ = tokio::time::timeout(CLOSE_GRACE, self.ws.flush()).await;
                    return Err(self.closed(code, reason));
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    /// Ends the connection as closed with `code`, with the server's hint if it gave one.
    fn closed(&mut self, code: u16, reason: String) -> CallError {
        let hint = match code {
            close::RESTART => self.expected_back_ms,
            _ => None,
        };
        let retry_after_ms = protocol::parse_retry_after(&reason).or(hint);
        self.end(CallError::Closed {
            code,
            reason,
            retry_after_ms,
        })
    }

    /// Records that the connection is over; returns the error for the caller.
    fn end(&mut self, err: CallError) -> CallError {
        self.ended = Some(err.clone());
        err
    }
}

/// The TLS side of `wss://`: see "TLS" in the module doc.
mod tls {
    use std::io;
    use std::sync::{Arc, OnceLock};

    use rustls::{ClientConfig, RootCertStore};
    use tokio_tungstenite::Connector;

    use super::ConnectError;

    /// What a certificate error adds, so an operator knows where trust comes from.
    const ROOTS_HINT: &str = "the gateway's certificate must chain to a CA in the system \
                              store, or in SSL_CERT_FILE / SSL_CERT_DIR when set";

    /// The connector for `url`: rustls for `wss://`, `None` (plain TCP) otherwise.
    pub(super) fn connector(url: &str) -> Result<Option<Connector>, ConnectError> {
        let is_wss = url
            .get(..6)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("wss://"));
        if !is_wss {
            return Ok(None);
        }
        Ok(Some(Connector::Rustls(config()?)))
    }

    /// The client config, built at the first `wss://` connect and then shared: reading the
    /// system's roots parses a file of about 150 certificates (synchronously, a few ms,
    /// once per process). A failure is not kept, so a later connect reads the roots again.
    fn config() -> Result<Arc<ClientConfig>, ConnectError> {
        static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
        if let Some(config) = CONFIG.get() {
            return Ok(config.clone());
        }
        let built = Arc::new(build()?);
        Ok(CONFIG.get_or_init(|| built).clone())
    }

    /// rustls with the aws-lc-rs provider, safe default protocol versions and the system's
    /// roots.
    fn build() -> Result<ClientConfig, ConnectError> {
        let loaded = rustls_native_certs::load_native_certs();
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(loaded.certs);
        let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
        if added == 0 {
            let why = if errors.is_empty() {
                format!("none found, {ignored} unusable")
            } else {
                errors.join("; ")
            };
            return Err(ConnectError::Tls(format!(
                "no CA certificates to check the gateway's certificate with ({why}); install \
                 the system's CA bundle (Debian: ca-certificates) or set SSL_CERT_FILE to a \
                 PEM file"
            )));
        }
        if !errors.is_empty() || ignored > 0 {
            tracing::warn!(
                added,
                ignored,
                errors = %errors.join("; "),
                "Some CA certificates could not be read; using the others."
            );
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ConnectError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(config)
    }

    /// Whether `err` is a failed TLS handshake (tokio-rustls wraps the rustls error).
    pub(super) fn is_handshake_error(err: &io::Error) -> bool {
        rustls_error(err).is_some()
    }

    /// The handshake failure in one line, with where trust comes from when it is the
    /// certificate that was refused.
    pub(super) fn handshake_text(err: &io::Error) -> String {
        match rustls_error(err) {
            Some(
                e @ rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
            ) => format!("{e}; {ROOTS_HINT}"),
            Some(e @ rustls::Error::InvalidMessage(_)) => {
                format!("{e}; the server does not seem to speak TLS (a ws:// listener?)")
            }
            Some(e) => e.to_string(),
            None => err.to_string(),
        }
    }

    fn rustls_error(err: &io::Error) -> Option<&rustls::Error> {
        err.get_ref()?.downcast_ref::<rustls::Error>()
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use serde_json::json;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    use super::*;

    type ServerWs = WebSocketStream<TcpStream>;

    #[test]
    fn a_failed_tls_handshake_is_its_own_class_and_not_retried() {
        let refused = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io_err = io::Error::new(io::ErrorKind::InvalidData, refused);
        let err = ConnectError::from_ws(tungstenite::Error::Io(io_err));
        assert!(matches!(err, ConnectError::Tls(_)), "{err:?}");
        assert!(!err.is_retryable());
        assert!(
            err.to_string()
                .starts_with("TLS: invalid peer certificate: UnknownIssuer; "),
            "{err}"
        );
        // A plain I/O error is still a network error.
        let reset = io::Error::new(io::ErrorKind::TimedOut, "timed out");
        let err = ConnectError::from_ws(tungstenite::Error::Io(reset));
        assert!(matches!(err, ConnectError::Io(_)), "{err:?}");
    }

    #[test]
    fn only_wss_urls_get_a_tls_connector() {
        let plain = tls::connector("ws://127.0.0.1:1/ws").expect("no roots needed");
        assert!(plain.is_none());
    }

    /// A one-connection WebSocket server playing the gateway's side with `play`.
    async fn serve_once<F, Fut>(play: F) -> (String, JoinHandle<()>)
    where
        F: FnOnce(ServerWs) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("ws://{}/ws", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
            play(ws).await;
        });
        (url, task)
    }

    async fn send(ws: &mut ServerWs, frame: Frame) {
        ws.send(Message::text(frame.to_text())).await.expect("send");
    }

    async fn challenge(ws: &mut ServerWs) {
        send(
            ws,
            Frame::event("connect.challenge", json!({"nonce": "n", "ts": 1})),
        )
        .await;
    }

    /// Reads the next request: (id, method, params).
    async fn recv_req(ws: &mut ServerWs) -> (String, String, Value) {
        loop {
            match ws.next().await.expect("open").expect("frame") {
                Message::Text(text) => match Frame::parse(text.as_str()).expect("frame") {
                    Frame::Req { id, method, params } => return (id, method, params),
                    other => panic!("expected a req, got {other:?}"),
                },
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    async fn hello(ws: &mut ServerWs, tick_interval_ms: u64) -> ConnectParams {
        challenge(ws).await;
        let (id, method, params) = recv_req(ws).await;
        assert_eq!(method, "connect");
        let payload = json!({
            "type": "hello-ok",
            "server": {"version": "test"},
            "policy": {"tick_interval_ms": tick_interval_ms, "max_frame_bytes": 1 << 20},
        });
        send(ws, Frame::ok(id, payload)).await;
        serde_json::from_value(params).expect("connect params")
    }

    async fn close_with(ws: &mut ServerWs, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        let _ = ws.close(Some(frame)).await;
        while let Some(Ok(_)) = ws.next().await {}
    }

    fn options() -> ConnectOptions {
        let client = ClientInfo {
            name: "test".into(),
            version: "0".into(),
        };
        ConnectOptions::new(Role::Operator, "t0k", client)
    }

    #[tokio::test]
    async fn connects_calls_and_keeps_events_that_arrive_meanwhile() {
        let (url, server) = serve_once(|mut ws| async move {
            let params = hello(&mut ws, 30_000).await;
            assert_eq!(params.token, "t0k");
            assert_eq!(params.role, Role::Operator);
            assert_eq!(params.protocol, PROTOCOL_VERSION);
            let (id, method, _) = recv_req(&mut ws).await;
            assert_eq!((id.as_str(), method.as_str()), ("2", "health"));
            send(&mut ws, Frame::event("tick", json!({"ts": 2}))).await;
            send(&mut ws, Frame::ok("99", json!("stray"))).await;
            send(&mut ws, Frame::ok(id, json!({"status": "ok"}))).await;
            let (id, method, _) = recv_req(&mut ws).await;
            assert_eq!((id.as_str(), method.as_str()), ("3", "nodes.invoke"));
            send(&mut ws, Frame::err(id, "unknown_node", "no node x")).await;
            send(
                &mut ws,
                Frame::event("node.connected", json!({"name": "x"})),
            )
            .await;
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;

        let (mut client, hello) = GatewayClient::connect(&url, options())
            .await
            .expect("connect");
        assert_eq!(hello.policy.tick_interval_ms, 30_000);
        assert_eq!(
            client.call("health", json!({})).await,
            Ok(json!({"status": "ok"}))
        );
        assert_eq!(
            client.call("nodes.invoke", json!({"node": "x"})).await,
            Err(CallError::Failed {
                code: "unknown_node".into(),
                message: "no node x".into()
            })
        );
        let tick = Incoming::Event {
            event: "tick".into(),
            payload: json!({"ts": 2}),
        };
        assert_eq!(client.next_event().await, Ok(tick));
        let connected = Incoming::Event {
            event: "node.connected".into(),
            payload: json!({"name": "x"}),
        };
        assert_eq!(client.next_event().await, Ok(connected));
        client.close().await;
        server.await.expect("server");
    }

    #[tokio::test]
    async fn unauthorized_is_rejected_and_not_retryable() {
        let (url, server) = serve_once(|mut ws| async move {
            challenge(&mut ws).await;
            let (id, _, _) = recv_req(&mut ws).await;
            send(
                &mut ws,
                Frame::err(id, protocol::code::UNAUTHORIZED, "bad token"),
            )
            .await;
            close_with(&mut ws, close::POLICY, "unauthorized").await;
        })
        .await;
        let err = GatewayClient::connect(&url, options())
            .await
            .expect_err("rejected");
        assert!(
            matches!(&err, ConnectError::Rejected { code, .. } if code == "unauthorized"),
            "{err:?}"
        );
        assert!(!err.is_retryable());
        assert_eq!(
            err.to_string(),
            "gateway rejected the connection: unauthorized: bad token"
        );
        server.await.expect("server");
    }

    #[tokio::test]
    async fn closes_before_hello_are_classified() {
        // 1013 right after the upgrade, with the server's hint.
        let (url, server) = serve_once(|mut ws| async move {
            close_with(&mut ws, close::TRY_AGAIN, &protocol::try_again_reason(900)).await;
        })
        .await;
        let err = GatewayClient::connect(&url, options())
            .await
            .expect_err("1013");
        assert!(
            matches!(err, ConnectError::Closed { code: 1013, .. }),
            "{err:?}"
        );
        assert!(err.is_retryable());
        assert_eq!(err.retry_after(), Some(Duration::from_millis(900)));
        server.await.expect("server");

        // 1012 during the handshake, after a shutdown notice.
        let (url, server) = serve_once(|mut ws| async move {
            challenge(&mut ws).await;
            let _ = recv_req(&mut ws).await;
            let notice = json!({"restart": true, "expected_back_ms": 1200});
            send(&mut ws, Frame::event("shutdown", notice)).await;
            close_with(&mut ws, close::RESTART, "service restart").await;
        })
        .await;
        let err = GatewayClient::connect(&url, options())
            .await
            .expect_err("1012");
        assert!(
            matches!(err, ConnectError::Closed { code: 1012, .. }),
            "{err:?}"
        );
        assert!(err.is_retryable());
        assert_eq!(err.retry_after(), Some(Duration::from_millis(1200)));
        assert_eq!(
            err.to_string(),
            "gateway closed the connection before hello (1012): service restart"
        );
        server.await.expect("server");

        // A policy close is final.
        let (url, server) = serve_once(|mut ws| async move {
            close_with(&mut ws, close::POLICY, "").await;
        })
        .await;
        let err = GatewayClient::connect(&url, options())
            .await
            .expect_err("1008");
        assert!(
            matches!(err, ConnectError::Closed { code: 1008, .. }),
            "{err:?}"
        );
        assert!(!err.is_retryable());
        server.await.expect("server");

        // A socket that just ends is an abnormal closure, retryable.
        let (url, server) = serve_once(|ws| async move { drop(ws) }).await;
        let err = GatewayClient::connect(&url, options())
            .await
            .expect_err("dropped");
        assert!(
            matches!(
                err,
                ConnectError::Closed {
                    code: ABNORMAL_CLOSURE,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.is_retryable());
        server.await.expect("server");
    }

    #[tokio::test]
    async fn refused_reset_and_busy_before_the_upgrade() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let err = GatewayClient::connect(&format!("ws://{addr}/ws"), options())
            .await
            .expect_err("refused");
        assert!(
            matches!(err, ConnectError::Refused(io::ErrorKind::ConnectionRefused)),
            "{err:?}"
        );
        assert!(err.is_retryable());
        assert_eq!(err.to_string(), "connection refused");

        // Accepted, then closed without an HTTP answer.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("ws://{}/ws", listener.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            drop(tcp);
        });
        let err = GatewayClient::connect(&url, options())
            .await
            .expect_err("reset");
        assert!(matches!(err, ConnectError::Refused(_)), "{err:?}");
        assert!(err.is_retryable());
        server.await.expect("server");

        // HTTP 503 with Retry-After, and a plain 501.
        for (status, want) in [
            (
                "503 Service Unavailable\r\nRetry-After: 2",
                "gateway busy (HTTP 503, retry after 2000 ms)",
            ),
            (
                "501 Not Implemented",
                "the server answered HTTP 501 instead of upgrading to WebSocket",
            ),
        ] {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let url = format!("ws://{}/ws", listener.local_addr().expect("addr"));
            let answer = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
            let server = tokio::spawn(async move {
                let (mut tcp, _) = listener.accept().await.expect("accept");
                tcp.write_all(answer.as_bytes()).await.expect("write");
            });
            let err = GatewayClient::connect(&url, options())
                .await
                .expect_err("http");
            assert_eq!(err.to_string(), want);
            assert_eq!(err.is_retryable(), want.contains("503"));
            if want.contains("503") {
                assert_eq!(err.retry_after(), Some(Duration::from_secs(2)));
            }
            server.await.expect("server");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_handshake_times_out() {
        let (url, server) = serve_once(|mut ws| async move {
            // Never sends the challenge; waits for the client to give up.
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
        let opts = ConnectOptions {
            handshake_timeout: Duration::from_millis(500),
            ..options()
        };
        let err = GatewayClient::connect(&url, opts)
            .await
            .expect_err("timeout");
        assert!(matches!(err, ConnectError::Timeout(_)), "{err:?}");
        assert!(!err.is_retryable());
        server.abort();
    }

    #[tokio::test]
    async fn a_connection_lost_mid_call_is_reported_as_such() {
        let (url, server) = serve_once(|mut ws| async move {
            hello(&mut ws, 30_000).await;
            let _ = recv_req(&mut ws).await;
            close_with(&mut ws, close::TRY_AGAIN, &protocol::try_again_reason(300)).await;
        })
        .await;
        let (mut client, _) = GatewayClient::connect(&url, options())
            .await
            .expect("connect");
        let err = client
            .call("chat.send", json!({}))
            .await
            .expect_err("closed");
        assert!(
            matches!(err, CallError::Closed { code: 1013, .. }),
            "{err:?}"
        );
        assert!(err.is_connection_lost());
        assert_eq!(err.retry_after(), Some(Duration::from_millis(300)));
        // The connection stays over: nothing more is sent.
        assert!(matches!(
            client.call("health", json!({})).await,
            Err(CallError::NotSent(_))
        ));
        server.await.expect("server");
    }

    #[tokio::test]
    async fn a_restart_mid_call_carries_the_expected_back_hint() {
        let (url, server) = serve_once(|mut ws| async move {
            hello(&mut ws, 30_000).await;
            let _ = recv_req(&mut ws).await;
            let notice = json!({"restart": true, "expected_back_ms": 2500});
            send(&mut ws, Frame::event("shutdown", notice)).await;
            close_with(&mut ws, close::RESTART, "service restart").await;
        })
        .await;
        let (mut client, _) = GatewayClient::connect(&url, options())
            .await
            .expect("connect");
        let err = client.call("status", json!({})).await.expect_err("restart");
        assert_eq!(
            err,
            CallError::Closed {
                code: close::RESTART,
                reason: "service restart".into(),
                retry_after_ms: Some(2500),
            }
        );
        assert_eq!(client.expected_back_ms(), Some(2500));
        // The shutdown event itself is kept for the caller.
        let Ok(Incoming::Event { event, .. }) = client.next_event().await else {
            panic!("expected the kept shutdown event");
        };
        assert_eq!(event, "shutdown");
        server.await.expect("server");
    }

    #[tokio::test]
    async fn two_silent_tick_intervals_end_the_connection_with_4000() {
        let (url, server) = serve_once(|mut ws| async move {
            hello(&mut ws, 1_000).await;
            match ws.next().await {
                Some(Ok(Message::Close(Some(frame)))) => {
                    assert_eq!(u16::from(frame.code), close::NO_TICK);
                }
                other => panic!("expected a close frame, got {other:?}"),
            }
        })
        .await;
        let (mut client, _) = GatewayClient::connect(&url, options())
            .await
            .expect("connect");
        // The socket is idle from here: let the paused clock jump to the deadline.
        tokio::time::pause();
        let started = Instant::now();
        let err = client.next_event().await.expect_err("silent");
        assert_eq!(err, CallError::Silent(Duration::from_secs(2)));
        // The deadline counts from the last frame, just before `started`; the paused clock
        // rounds timers up to the next millisecond.
        let waited = started.elapsed();
        assert!(
            waited > Duration::from_millis(1_990) && waited <= Duration::from_millis(2_001),
            "{waited:?}"
        );
        tokio::time::resume();
        server.await.expect("server");
    }

    #[tokio::test]
    async fn server_requests_are_answered_with_respond() {
        let (url, server) = serve_once(|mut ws| async move {
            hello(&mut ws, 30_000).await;
            let req = Frame::Req {
                id: "s1".into(),
                method: "node.invoke".into(),
                params: json!({"command": "uptime"}),
            };
            send(&mut ws, req).await;
            match ws.next().await.expect("open").expect("frame") {
                Message::Text(text) => {
                    assert_eq!(
                        Frame::parse(text.as_str()),
                        Ok(Frame::ok("s1", json!("up 1 day")))
                    );
                }
                other => panic!("expected the answer, got {other:?}"),
            }
        })
        .await;
        let (mut client, _) = GatewayClient::connect(&url, options())
            .await
            .expect("connect");
        let Ok(Incoming::Request { id, method, .. }) = client.next_event().await else {
            panic!("expected a request");
        };
        assert_eq!(method, "node.invoke");
        client
            .respond(&id, Ok(json!("up 1 day")))
            .await
            .expect("respond");
        server.await.expect("server");
        client.close().await;
    }
}
