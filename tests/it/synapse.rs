//! A real Matrix homeserver (Synapse) for the Matrix tests, and the clients that play the
//! other side.
//!
//! `scripts/test.sh` starts one Synapse for the whole run and exports where it is
//! (`SYNAPSE_TEST_*`); [`Synapse::shared`] reads that, and [`require!`] skips a test when it
//! is absent (outside CI). A test that stops its homeserver starts its own with
//! [`Synapse::start_private`]. Every test registers its own users ([`Synapse::register`]:
//! unique names, safe in parallel), so tests share the homeserver but nothing on it.
//!
//! [`User`] speaks the raw Client-Server API over reqwest (no SDK, so what it sees is what
//! the server holds); [`EncryptedPeer`] is a real end-to-end-encrypting client (matrix-sdk)
//! for the peer side of encrypted-room tests. Waits poll with deadlines, never fixed sleeps.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use matrix_sdk::config::{RequestConfig, SyncSettings};
use matrix_sdk::room::MessagesOptions;
use matrix_sdk::ruma::api::client::room::Visibility;
use matrix_sdk::ruma::api::client::room::create_room::v3::{
    Request as CreateRoomRequest, RoomPreset,
};
use matrix_sdk::ruma::events::InitialStateEvent;
use matrix_sdk::ruma::events::relation::Reply;
use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;
use matrix_sdk::ruma::events::room::member::MembershipState;
use matrix_sdk::ruma::events::room::message::{
    OriginalSyncRoomMessageEvent, Relation, RoomMessageEventContent,
};
use matrix_sdk::ruma::{OwnedUserId, RoomId, UserId};
use matrix_sdk::{Client, Room};
use reqwest::Method;
use serde_json::{Value, json};
use sha1::Sha1;
use tokio::time::Instant;

use crate::support::{TempDir, eventually};

/// The message of a test that needs Synapse under CI and has none.
const REQUIRED: &str = "Synapse is required under CI=true: run the tests through scripts/test.sh \
     (it starts one and exports SYNAPSE_TEST_URL, SYNAPSE_TEST_SHARED_SECRET, SYNAPSE_TEST_DIR, \
     SYNAPSE_TEST_SCRIPT)";

/// The shared Synapse, or skips the calling test: `let Some(hs) = synapse::require!() else {
/// return };`. Panics under `CI=true` when there is none (see [`Synapse::shared`]).
macro_rules! require {
    () => {
        $crate::synapse::Synapse::require(concat!(module_path!(), ":", line!()))
    };
}
pub(crate) use require;

/// A running Synapse: the one of the test run, or a private one that is stopped on drop.
pub(crate) struct Synapse {
    url: String,
    shared_secret: String,
    dir: PathBuf,
    script: PathBuf,
    /// The directory of a private Synapse (removed after it is stopped); `None` for the
    /// shared one, which `scripts/test.sh` owns.
    private: Option<TempDir>,
}

impl Synapse {
    /// The Synapse `scripts/test.sh` started for this run, from the `SYNAPSE_TEST_*`
    /// variables. `None` when they are unset, unless `CI=true`: then it panics, since CI
    /// must not skip the Matrix tests.
    pub(crate) fn shared() -> Option<&'static Synapse> {
        static SHARED: OnceLock<Option<Synapse>> = OnceLock::new();
        let shared = SHARED.get_or_init(|| {
            let url = std::env::var("SYNAPSE_TEST_URL").ok()?;
            let var = |name: &str| {
                std::env::var(name)
                    .unwrap_or_else(|_| panic!("SYNAPSE_TEST_URL is set but {name} is not"))
            };
            Some(Synapse {
                url: url.trim_end_matches('/').to_string(),
                shared_secret: var("SYNAPSE_TEST_SHARED_SECRET"),
                dir: var("SYNAPSE_TEST_DIR").into(),
                script: var("SYNAPSE_TEST_SCRIPT").into(),
                private: None,
            })
        });
        if shared.is_none() && std::env::var("CI").as_deref() == Ok("true") {
            panic!("{REQUIRED}");
        }
        shared.as_ref()
    }

    /// [`Synapse::shared`], saying on stderr that `test` is skipped when there is none. Use
    /// it through [`require!`].
    pub(crate) fn require(test: &str) -> Option<&'static Synapse> {
        let shared = Self::shared();
        if shared.is_none() {
            // libtest names a test's thread after the test.
            let thread = std::thread::current();
            let test = thread.name().filter(|n| *n != "main").unwrap_or(test);
            eprintln!(
                "skipped {test}: no Synapse (SYNAPSE_TEST_URL is unset; scripts/test.sh starts one)"
            );
        }
        shared
    }

    /// Starts a Synapse of its own for one test (`scripts/synapse.sh start` in a scratch
    /// directory named after `name`), on a free port. It can be stopped and started again
    /// at the same URL with the same data; it is stopped when dropped. Call [`require!`]
    /// first, so that the test is skipped where Synapse is not available.
    pub(crate) async fn start_private(name: &str) -> Synapse {
        let script = std::env::var_os("SYNAPSE_TEST_SCRIPT")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/synapse.sh"));
        let dir = TempDir::new(&format!("synapse-{name}-{}", next()));
        let mut synapse = Synapse {
            url: String::new(),
            shared_secret: String::new(),
            dir: dir.path().to_path_buf(),
            script,
            private: Some(dir),
        };
        synapse.url = synapse.script(&["start"], None).await;
        synapse.shared_secret = std::fs::read_to_string(synapse.dir.join("shared_secret"))
            .expect("synapse.sh start writes DIR/shared_secret")
            .trim()
            .to_string();
        synapse
    }

    /// Stops a private Synapse (its data stays); connections to its URL are refused until
    /// [`Synapse::start_again`].
    pub(crate) async fn stop(&self) {
        assert!(
            self.private.is_some(),
            "only a private Synapse can be stopped"
        );
        self.script(&["stop"], None).await;
    }

    /// Starts a stopped private Synapse again: same port, same data, same users.
    pub(crate) async fn start_again(&self) {
        assert!(
            self.private.is_some(),
            "only a private Synapse can be restarted"
        );
        let url = self.script(&["start"], Some(self.addr().port())).await;
        assert_eq!(url, self.url, "restarted on another URL");
    }

    /// Runs `scripts/synapse.sh ARGS DIR` (with `SYNAPSE_PORT=port` when given); returns
    /// its standard output, trimmed. Panics with its log when it fails.
    async fn script(&self, args: &[&str], port: Option<u16>) -> String {
        let mut command = tokio::process::Command::new("bash");
        command.arg(&self.script).args(args).arg(&self.dir);
        match port {
            Some(port) => command.env("SYNAPSE_PORT", port.to_string()),
            None => command.env_remove("SYNAPSE_PORT"),
        };
        let out = command.output().await.expect("run scripts/synapse.sh");
        assert!(
            out.status.success(),
            "synapse.sh {args:?} {} failed ({}):\n{}{}",
            self.dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The base URL, `http://127.0.0.1:PORT` (the server name is `localhost`).
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// The address it listens on, e.g. to put a fault proxy in front of it.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.url
            .trim_start_matches("http://")
            .parse()
            .expect("the Synapse URL is http://IP:PORT")
    }

    /// Its directory: `homeserver.yaml`, `homeserver.log` (warnings and errors), `data/`.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Registers a new user named after `prefix` (`{prefix}-{n}-{run}`, lowercase, unique
    /// across tests and runs) through the shared-secret admin API, and returns it logged in
    /// (one device). Safe to call from many tests at once.
    pub(crate) async fn register(&self, prefix: &str) -> User {
        self.register_as(prefix, false).await
    }

    /// [`Synapse::register`], as a server admin (for the admin API).
    pub(crate) async fn register_admin(&self, prefix: &str) -> User {
        self.register_as(prefix, true).await
    }

    async fn register_as(&self, prefix: &str, admin: bool) -> User {
        let localpart = unique_localpart(prefix);
        let password = format!("pw-{localpart}");
        let endpoint = format!("{}/_synapse/admin/v1/register", self.url);
        // A client per user, not one for the Synapse: the shared Synapse outlives each
        // test's runtime, and pooled connections die with the runtime that opened them.
        let http = http_client();
        let nonce = http
            .get(&endpoint)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("GET a registration nonce")
            .json::<Value>()
            .await
            .expect("a nonce is JSON")["nonce"]
            .as_str()
            .expect("a nonce")
            .to_string();
        let mut mac = Hmac::<Sha1>::new_from_slice(self.shared_secret.as_bytes())
            .expect("HMAC takes a key of any length");
        let kind = if admin { "admin" } else { "notadmin" };
        for (i, part) in [nonce.as_str(), &localpart, &password, kind]
            .into_iter()
            .enumerate()
        {
            if i > 0 {
                mac.update(b"\0");
            }
            mac.update(part.as_bytes());
        }
        let mac: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let body = json!({
            "nonce": nonce, "username": localpart, "password": password,
            "admin": admin, "mac": mac,
        });
        let reply = http
            .post(&endpoint)
            .json(&body)
            .send()
            .await
            .expect("POST the registration");
        let status = reply.status();
        let reply: Value = reply.json().await.unwrap_or(Value::Null);
        assert!(
            status.is_success(),
            "registering {localpart} failed: {status} {reply}"
        );
        let field = |name: &str| {
            reply[name]
                .as_str()
                .unwrap_or_else(|| panic!("no {name} in the registration reply {reply}"))
                .to_string()
        };
        User {
            user_id: field("user_id"),
            localpart,
            password,
            access_token: field("access_token"),
            device_id: field("device_id"),
            homeserver_url: self.url.clone(),
            http,
        }
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        if self.private.is_some() {
            // Before the scratch directory goes (fields drop after this).
            let _ = std::process::Command::new("bash")
                .arg(&self.script)
                .arg("stop")
                .arg(&self.dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// The HTTP client of the raw API: bounded, so a test fails instead of hanging.
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .build()
        .expect("an HTTP client")
}

/// `{prefix}-{n}-{run}`: `n` counts in this process, `run` tells processes apart (pid and
/// clock), so names never repeat on a Synapse that outlives one test binary.
fn unique_localpart(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static RUN: OnceLock<String> = OnceLock::new();
    let run = RUN.get_or_init(|| {
        let clock = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        format!("{:x}{clock:x}", std::process::id())
    });
    let prefix: String = prefix
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .filter(|c| c.is_ascii_alphanumeric() || "._=/".contains(*c))
        .collect();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{n}-{run}")
}

/// A number unique in this process: transaction ids, scratch directories.
fn next() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A registered user and the device its registration created, talking the raw
/// Client-Server API (no SDK, no sync, no encryption). Its methods panic with the server's
/// answer when a call fails; [`User::api`] returns it instead.
#[derive(Clone)]
pub(crate) struct User {
    /// `@localpart:localhost`.
    pub(crate) user_id: String,
    /// The localpart, also the login name.
    pub(crate) localpart: String,
    /// The password.
    pub(crate) password: String,
    /// The access token of the registration's device.
    pub(crate) access_token: String,
    /// The registration's device.
    pub(crate) device_id: String,
    /// Where its requests go (`http://127.0.0.1:PORT`; see [`User::via`]).
    pub(crate) homeserver_url: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("homeserver_url", &self.homeserver_url)
            .finish_non_exhaustive()
    }
}

/// A message-like event of a room's timeline, as the server returns it.
#[derive(Clone, Debug)]
pub(crate) struct Message {
    /// The event id.
    pub(crate) event_id: String,
    /// Who sent it.
    pub(crate) sender: String,
    /// The event type: `m.room.message`, `m.room.encrypted` (not decrypted: the raw API
    /// has no keys), `m.reaction`, …
    pub(crate) kind: String,
    /// `content.msgtype` (`m.text`, `m.notice`, …) of an `m.room.message`.
    pub(crate) msgtype: Option<String>,
    /// `content.body` of an `m.room.message`.
    pub(crate) body: Option<String>,
    /// The whole content.
    pub(crate) content: Value,
}

impl Message {
    /// Whether it is an `m.room.encrypted` event.
    pub(crate) fn is_encrypted(&self) -> bool {
        self.kind == "m.room.encrypted"
    }

    /// The event id and key of an `m.reaction` (an `m.annotation`).
    pub(crate) fn reaction(&self) -> Option<(&str, &str)> {
        let relates = &self.content["m.relates_to"];
        match (
            self.kind.as_str(),
            relates["event_id"].as_str(),
            relates["key"].as_str(),
        ) {
            ("m.reaction", Some(event), Some(key)) => Some((event, key)),
            _ => None,
        }
    }
}

impl User {
    /// The same user and device, its requests sent to `url` instead (e.g. a fault proxy).
    pub(crate) fn via(&self, url: &str) -> User {
        User {
            homeserver_url: url.trim_end_matches('/').to_string(),
            ..self.clone()
        }
    }

    /// Calls `/_matrix/client/v3/{path…}` with this user's token (or `token` when given),
    /// each of `path` one percent-encoded segment; returns the status and the JSON body
    /// (`Null` when there is none). Fails only when there is no HTTP answer.
    pub(crate) async fn api(
        &self,
        method: Method,
        path: &[&str],
        query: &[(&str, &str)],
        body: Option<Value>,
        token: Option<&str>,
    ) -> Result<(u16, Value), reqwest::Error> {
        let mut url = reqwest::Url::parse(&self.homeserver_url).expect("a homeserver URL");
        url.path_segments_mut()
            .expect("an http URL")
            .pop_if_empty()
            .extend(["_matrix", "client", "v3"])
            .extend(path);
        let mut request = self
            .http
            .request(method, url)
            .bearer_auth(token.unwrap_or(&self.access_token))
            .query(query);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let reply = request.send().await?;
        let status = reply.status().as_u16();
        let body = reply.json::<Value>().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// [`User::api`] with this user's token, expecting a 2xx answer; returns its body.
    async fn call(
        &self,
        method: Method,
        path: &[&str],
        query: &[(&str, &str)],
        body: Option<Value>,
    ) -> Value {
        let what = format!("{method} {}", path.join("/"));
        let (status, reply) = self
            .api(method, path, query, body, None)
            .await
            .unwrap_or_else(|e| panic!("{} {what}: no answer: {e}", self.user_id));
        assert!(
            (200..300).contains(&status),
            "{} {what}: HTTP {status} {reply}",
            self.user_id
        );
        reply
    }

    /// Creates a private room (`private_chat` preset) inviting `invite`; end-to-end
    /// encrypted (`m.room.encryption`, megolm, in the initial state) when `encrypted`.
    /// Returns its id.
    pub(crate) async fn create_room(&self, invite: &[&str], encrypted: bool) -> String {
        self.create(invite, encrypted, false).await
    }

    /// Creates a direct chat with `with` (`is_direct`, `trusted_private_chat` preset,
    /// recorded in this user's `m.direct`), encrypted when `encrypted`. Returns its id.
    pub(crate) async fn create_dm(&self, with: &str, encrypted: bool) -> String {
        let room_id = self.create(&[with], encrypted, true).await;
        let path = ["user", &self.user_id, "account_data", "m.direct"];
        let mut direct = match self.api(Method::GET, &path, &[], None, None).await {
            Ok((200, Value::Object(map))) => map,
            _ => serde_json::Map::new(),
        };
        let rooms = direct.entry(with).or_insert_with(|| json!([]));
        if let Value::Array(rooms) = rooms {
            rooms.push(json!(room_id));
        }
        self.call(Method::PUT, &path, &[], Some(Value::Object(direct)))
            .await;
        room_id
    }

    async fn create(&self, invite: &[&str], encrypted: bool, direct: bool) -> String {
        let mut body = json!({
            "preset": if direct { "trusted_private_chat" } else { "private_chat" },
            "invite": invite,
            "is_direct": direct,
        });
        if encrypted {
            body["initial_state"] = json!([{
                "type": "m.room.encryption",
                "state_key": "",
                "content": {"algorithm": "m.megolm.v1.aes-sha2"},
            }]);
        }
        let reply = self
            .call(Method::POST, &["createRoom"], &[], Some(body))
            .await;
        reply["room_id"].as_str().expect("a room_id").to_string()
    }

    /// Joins a room (after an invite, for a private one).
    pub(crate) async fn join(&self, room_id: &str) {
        self.call(Method::POST, &["join", room_id], &[], Some(json!({})))
            .await;
    }

    /// Invites `user_id` into a room.
    pub(crate) async fn invite(&self, room_id: &str, user_id: &str) {
        let body = json!({"user_id": user_id});
        self.call(Method::POST, &["rooms", room_id, "invite"], &[], Some(body))
            .await;
    }

    /// Leaves a room.
    pub(crate) async fn leave(&self, room_id: &str) {
        self.call(
            Method::POST,
            &["rooms", room_id, "leave"],
            &[],
            Some(json!({})),
        )
        .await;
    }

    /// Sends an `m.text` message (in clear, even in an encrypted room: this client has no
    /// keys). Returns its event id.
    pub(crate) async fn send_text(&self, room_id: &str, body: &str) -> String {
        let content = json!({"msgtype": "m.text", "body": body});
        self.send(room_id, "m.room.message", content).await
    }

    /// Reacts to `event_id` with `key` (an `m.reaction` annotation). Returns its event id.
    pub(crate) async fn send_reaction(&self, room_id: &str, event_id: &str, key: &str) -> String {
        let content = json!({"m.relates_to": {
            "rel_type": "m.annotation", "event_id": event_id, "key": key,
        }});
        self.send(room_id, "m.reaction", content).await
    }

    /// Sends a message-like event of type `kind`. Returns its event id.
    pub(crate) async fn send(&self, room_id: &str, kind: &str, content: Value) -> String {
        let txn = format!("t{}-{}", std::process::id(), next());
        let path = ["rooms", room_id, "send", kind, &txn];
        let reply = self.call(Method::PUT, &path, &[], Some(content)).await;
        reply["event_id"].as_str().expect("an event_id").to_string()
    }

    /// The last `limit` message-like events of a room (state events left out), oldest
    /// first; encrypted ones as `m.room.encrypted`.
    pub(crate) async fn messages(&self, room_id: &str, limit: u32) -> Vec<Message> {
        let limit = limit.to_string();
        let query = [("dir", "b"), ("limit", limit.as_str())];
        let reply = self
            .call(Method::GET, &["rooms", room_id, "messages"], &query, None)
            .await;
        let mut messages: Vec<Message> = reply["chunk"]
            .as_array()
            .expect("a chunk")
            .iter()
            .filter(|e| e.get("state_key").is_none())
            .map(|e| {
                let text = |v: &Value| v.as_str().map(str::to_string);
                let kind = text(&e["type"]).unwrap_or_default();
                let is_message = kind == "m.room.message";
                Message {
                    event_id: text(&e["event_id"]).unwrap_or_default(),
                    sender: text(&e["sender"]).unwrap_or_default(),
                    msgtype: text(&e["content"]["msgtype"]).filter(|_| is_message),
                    body: text(&e["content"]["body"]).filter(|_| is_message),
                    content: e["content"].clone(),
                    kind,
                }
            })
            .collect();
        messages.reverse();
        messages
    }

    /// As a server admin, limits `user`'s messages to `per_second` with bursts of `burst`
    /// (`POST /_synapse/admin/v1/users/<user>/override_ratelimit`): past it the homeserver
    /// answers 429 with a `retry_after_ms`. Other users keep the test server's raised limits.
    pub(crate) async fn limit_messages(&self, user: &User, per_second: u32, burst: u32) {
        let mut url = reqwest::Url::parse(&self.homeserver_url).expect("a homeserver URL");
        url.path_segments_mut()
            .expect("an http URL")
            .pop_if_empty()
            .extend([
                "_synapse",
                "admin",
                "v1",
                "users",
                &user.user_id,
                "override_ratelimit",
            ]);
        let body = json!({"messages_per_second": per_second, "burst_count": burst});
        let reply = self
            .http
            .post(url)
            .bearer_auth(&self.access_token)
            .json(&body)
            .send()
            .await
            .expect("override_ratelimit");
        let status = reply.status();
        let text = reply.text().await.unwrap_or_default();
        assert!(
            status.is_success(),
            "override_ratelimit of {}: {status} {text}",
            user.user_id
        );
    }

    /// Deactivates this user (`POST /account/deactivate`, authenticated by password):
    /// every token of it stops working, and it can no longer log in.
    pub(crate) async fn deactivate(&self) {
        let (status, body) = self
            .api(
                Method::POST,
                &["account", "deactivate"],
                &[],
                Some(json!({})),
                None,
            )
            .await
            .expect("deactivate");
        assert_eq!(status, 401, "deactivate without auth: {body}");
        let auth = json!({"auth": {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": self.localpart},
            "password": self.password,
            "session": body["session"],
        }});
        let (status, body) = self
            .api(
                Method::POST,
                &["account", "deactivate"],
                &[],
                Some(auth),
                None,
            )
            .await
            .expect("deactivate");
        assert_eq!(status, 200, "deactivate {}: {body}", self.user_id);
    }

    /// Waits until the last 100 events of a room hold a message that `matches`; returns it.
    /// Panics after `within`, listing what is there.
    pub(crate) async fn wait_for_message(
        &self,
        room_id: &str,
        matches: impl Fn(&Message) -> bool,
        within: Duration,
    ) -> Message {
        let what = format!("{}: a matching message in {room_id}", self.user_id);
        eventually(within, what, async || {
            let messages = self.messages(room_id, 100).await;
            match messages.iter().find(|m| matches(m)) {
                Some(found) => Ok(found.clone()),
                None => Err(format!("there are:\n{messages:#?}")),
            }
        })
        .await
    }

    /// The users joined to a room, sorted.
    pub(crate) async fn joined_members(&self, room_id: &str) -> Vec<String> {
        let reply = self
            .call(
                Method::GET,
                &["rooms", room_id, "joined_members"],
                &[],
                None,
            )
            .await;
        let mut members: Vec<String> = reply["joined"]
            .as_object()
            .expect("a joined map")
            .keys()
            .cloned()
            .collect();
        members.sort();
        members
    }

    /// Waits until `user_id` is joined to a room (this user must be in it). Panics after
    /// `within`.
    pub(crate) async fn wait_joined(&self, room_id: &str, user_id: &str, within: Duration) {
        eventually(within, format!("{user_id} joins {room_id}"), async || {
            let members = self.joined_members(room_id).await;
            if members.iter().any(|m| m == user_id) {
                Ok(())
            } else {
                Err(format!("joined: {members:?}"))
            }
        })
        .await
    }

    /// Logs in with the password: a new device. Returns its access token and device id.
    pub(crate) async fn login_fresh(&self) -> (String, String) {
        match self.try_login().await {
            Ok(session) => session,
            Err(e) => panic!("{} cannot log in: {e}", self.user_id),
        }
    }

    /// [`User::login_fresh`], returning the failure (no answer, or the status and body).
    pub(crate) async fn try_login(&self) -> Result<(String, String), String> {
        let body = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": self.localpart},
            "password": self.password,
        });
        let (status, reply) = self
            .api(Method::POST, &["login"], &[], Some(body), None)
            .await
            .map_err(|e| format!("no answer: {e}"))?;
        match (
            status,
            reply["access_token"].as_str(),
            reply["device_id"].as_str(),
        ) {
            (200, Some(token), Some(device)) => Ok((token.to_string(), device.to_string())),
            _ => Err(format!("HTTP {status} {reply}")),
        }
    }

    /// Who this user's token says it is (`GET /account/whoami`).
    pub(crate) async fn whoami(&self) -> String {
        match self.whoami_with(&self.access_token).await {
            Ok(user_id) => user_id,
            Err(status) => panic!("{}: whoami answered HTTP {status}", self.user_id),
        }
    }

    /// Who `token` belongs to, or the HTTP status of the refusal (401 for an unknown or
    /// logged-out token; 0 when there is no answer).
    pub(crate) async fn whoami_with(&self, token: &str) -> Result<String, u16> {
        match self
            .api(Method::GET, &["account", "whoami"], &[], None, Some(token))
            .await
        {
            Ok((200, reply)) => Ok(reply["user_id"].as_str().unwrap_or_default().to_string()),
            Ok((status, _)) => Err(status),
            Err(_) => Err(0),
        }
    }

    /// Logs out the device of `token` (the token stops working).
    pub(crate) async fn logout(&self, token: &str) {
        let (status, reply) = self
            .api(Method::POST, &["logout"], &[], Some(json!({})), Some(token))
            .await
            .expect("an answer to logout");
        assert_eq!(status, 200, "logout: {reply}");
    }
}

/// A message an [`EncryptedPeer`] received through sync, decrypted.
#[derive(Clone, Debug)]
pub(crate) struct Received {
    /// The room.
    pub(crate) room_id: String,
    /// The event id.
    pub(crate) event_id: String,
    /// Who sent it.
    pub(crate) sender: String,
    /// The (decrypted) body.
    pub(crate) body: String,
    /// Whether it came encrypted (and this peer decrypted it).
    pub(crate) encrypted: bool,
}

/// A real end-to-end-encrypting Matrix client (matrix-sdk, sqlite store in a scratch
/// directory) for the peer side of encrypted-room tests: it logs in as a [`User`] (a new
/// device), syncs in the background until dropped, encrypts what it sends to encrypted
/// rooms and decrypts what it receives.
pub(crate) struct EncryptedPeer {
    /// The SDK client, for what the methods here do not cover.
    pub(crate) client: Client,
    received: Arc<Mutex<Vec<Received>>>,
    sync: tokio::task::JoinHandle<()>,
    _store: TempDir,
}

impl EncryptedPeer {
    /// Logs in as `user` with its password (a new device with new keys), runs a first sync
    /// (which uploads the device keys), then keeps syncing in the background.
    pub(crate) async fn login(user: &User) -> EncryptedPeer {
        let store = TempDir::new(&format!("peer-{}-{}", user.localpart, next()));
        let client = Client::builder()
            .homeserver_url(&user.homeserver_url)
            .sqlite_store(store.path(), None)
            // The SDK retries transient errors for up to 15 minutes by default: a test
            // should fail long before that.
            .request_config(RequestConfig::short_retry())
            .build()
            .await
            .expect("build a matrix-sdk client");
        client
            .matrix_auth()
            .login_username(&user.localpart, &user.password)
            .initial_device_display_name("warden test peer")
            .send()
            .await
            .unwrap_or_else(|e| panic!("{} cannot log in with matrix-sdk: {e}", user.user_id));

        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        client.add_event_handler(
            move |ev: OriginalSyncRoomMessageEvent,
                  room: Room,
                  encryption: Option<matrix_sdk::deserialized_responses::EncryptionInfo>| {
                let sink = sink.clone();
                async move {
                    record(
                        &sink,
                        Received {
                            room_id: room.room_id().to_string(),
                            event_id: ev.event_id.to_string(),
                            sender: ev.sender.to_string(),
                            body: ev.content.body().to_string(),
                            encrypted: encryption.is_some(),
                        },
                    );
                }
            },
        );
        client
            .sync_once(SyncSettings::default().timeout(Duration::ZERO))
            .await
            .unwrap_or_else(|e| panic!("{}: first sync failed: {e}", user.user_id));
        let sync = tokio::spawn({
            let client = client.clone();
            async move {
                // `Client::sync` is this loop, but its future is too deep for this crate's
                // default recursion limit to prove it `Send` (matrix-sdk raises its own to
                // 256); `sync_once` is not. Each call continues from the last sync token.
                loop {
                    let settings = SyncSettings::default().timeout(Duration::from_secs(5));
                    if let Err(e) = client.sync_once(settings).await {
                        eprintln!("encrypted peer: sync failed ({e}); syncing again");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        EncryptedPeer {
            client,
            received,
            sync,
            _store: store,
        }
    }

    /// This peer's user id.
    pub(crate) fn user_id(&self) -> String {
        self.client
            .user_id()
            .map(|u| u.to_string())
            .unwrap_or_default()
    }

    /// This peer's device id (not the registration's).
    pub(crate) fn device_id(&self) -> String {
        self.client
            .device_id()
            .map(|d| d.to_string())
            .unwrap_or_default()
    }

    /// Creates an encrypted private room inviting `invite`. Returns its id.
    pub(crate) async fn create_encrypted_room(&self, invite: &[&str]) -> String {
        self.create(invite, false).await
    }

    /// Creates an encrypted direct chat with `with` (`is_direct`). Returns its id.
    pub(crate) async fn create_encrypted_dm(&self, with: &str) -> String {
        self.create(&[with], true).await
    }

    async fn create(&self, invite: &[&str], direct: bool) -> String {
        let mut request = CreateRoomRequest::new();
        request.invite = invite
            .iter()
            .map(|u| UserId::parse(*u).expect("a user id"))
            .collect::<Vec<OwnedUserId>>();
        request.is_direct = direct;
        request.preset = Some(if direct {
            RoomPreset::TrustedPrivateChat
        } else {
            RoomPreset::PrivateChat
        });
        request.visibility = Visibility::Private;
        request.initial_state = vec![
            InitialStateEvent::with_empty_state_key(
                RoomEncryptionEventContent::with_recommended_defaults(),
            )
            .to_raw_any(),
        ];
        let room = self
            .client
            .create_room(request)
            .await
            .unwrap_or_else(|e| panic!("{}: create an encrypted room: {e}", self.user_id()));
        room.room_id().to_string()
    }

    /// Joins a room (after an invite, for a private one).
    pub(crate) async fn join(&self, room_id: &str) {
        let id = RoomId::parse(room_id).expect("a room id");
        self.client
            .join_room_by_id(&id)
            .await
            .unwrap_or_else(|e| panic!("{}: join {room_id}: {e}", self.user_id()));
    }

    /// A room this client knows (it has synced it), waiting up to 10 s for it.
    async fn room(&self, room_id: &str) -> Room {
        let id = RoomId::parse(room_id).expect("a room id");
        let what = format!("{}: {room_id} appears in sync", self.user_id());
        let room = async || self.client.get_room(&id);
        eventually(Duration::from_secs(10), what, room).await
    }

    /// Sends an `m.text` message, encrypted for every device of every joined member when
    /// the room is encrypted. Wait for the recipients to be joined first
    /// ([`EncryptedPeer::wait_joined`]): the room key goes only to the members this client
    /// knows. Returns its event id.
    pub(crate) async fn send_text(&self, room_id: &str, body: &str) -> String {
        let room = self.room(room_id).await;
        let sent = room
            .send(RoomMessageEventContent::text_plain(body))
            .await
            .unwrap_or_else(|e| panic!("{}: send to {room_id}: {e}", self.user_id()));
        sent.response.event_id.to_string()
    }

    /// Sends an `m.text` reply to `event_id` (a rich reply with no fallback), encrypted as
    /// [`EncryptedPeer::send_text`] is. Returns its event id.
    pub(crate) async fn send_reply(&self, room_id: &str, event_id: &str, body: &str) -> String {
        let room = self.room(room_id).await;
        let mut content = RoomMessageEventContent::text_plain(body);
        let target = matrix_sdk::ruma::OwnedEventId::try_from(event_id).expect("an event id");
        content.relates_to = Some(Relation::Reply(Reply::with_event_id(target)));
        let sent = room
            .send(content)
            .await
            .unwrap_or_else(|e| panic!("{}: reply in {room_id}: {e}", self.user_id()));
        sent.response.event_id.to_string()
    }

    /// The messages received so far (decrypted), in the order they came.
    pub(crate) fn received(&self) -> Vec<Received> {
        self.received.lock().expect("received").clone()
    }

    /// Waits for a message in `room_id` for which `matches(sender, body)` holds, received
    /// through sync and decrypted; returns its body. Panics after `within`.
    pub(crate) async fn wait_for_text(
        &self,
        room_id: &str,
        matches: impl Fn(&str, &str) -> bool,
        within: Duration,
    ) -> String {
        self.wait_for_message(room_id, |m| matches(&m.sender, &m.body), within)
            .await
            .body
    }

    /// [`EncryptedPeer::wait_for_text`], returning the whole message (was it encrypted?).
    /// Besides sync it reads the room's recent history about once a second: an event that
    /// came before its room key is decrypted there once the key has arrived.
    pub(crate) async fn wait_for_message(
        &self,
        room_id: &str,
        matches: impl Fn(&Received) -> bool,
        within: Duration,
    ) -> Received {
        let found = |peer: &Self| {
            peer.received()
                .into_iter()
                .find(|m| m.room_id == room_id && matches(m))
        };
        let mut next_history = Instant::now() + Duration::from_secs(1);
        let what = format!("{}: a matching message in {room_id}", self.user_id());
        eventually(within, what, async || {
            if let Some(message) = found(self) {
                return Ok(message);
            }
            if Instant::now() >= next_history {
                self.read_history(room_id).await;
                next_history = Instant::now() + Duration::from_secs(1);
                if let Some(message) = found(self) {
                    return Ok(message);
                }
            }
            Err(format!("received: {:#?}", self.received()))
        })
        .await
    }

    /// Adds the decryptable `m.room.message`s of the last 50 events of a room to what was
    /// received.
    async fn read_history(&self, room_id: &str) {
        let Some(room) = RoomId::parse(room_id)
            .ok()
            .and_then(|id| self.client.get_room(&id))
        else {
            return;
        };
        let mut options = MessagesOptions::backward();
        options.limit = 50u32.into();
        let Ok(messages) = room.messages(options).await else {
            return;
        };
        for event in messages.chunk {
            let encrypted = event.encryption_info().is_some();
            let Ok(raw) = serde_json::from_str::<Value>(event.raw().json().get()) else {
                continue;
            };
            if raw["type"] != "m.room.message" {
                continue;
            }
            let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
            record(
                &self.received,
                Received {
                    room_id: room_id.to_string(),
                    event_id: text(&raw["event_id"]),
                    sender: text(&raw["sender"]),
                    body: text(&raw["content"]["body"]),
                    encrypted,
                },
            );
        }
    }

    /// Waits until this client has seen `user_id` joined to a room (through sync). Panics
    /// after `within`.
    pub(crate) async fn wait_joined(&self, room_id: &str, user_id: &str, within: Duration) {
        let id = RoomId::parse(room_id).expect("a room id");
        let user = UserId::parse(user_id).expect("a user id");
        let what = format!("{}: sees {user_id} join {room_id}", self.user_id());
        eventually(within, what, async || {
            let Some(room) = self.client.get_room(&id) else {
                return false;
            };
            let member = room.get_member_no_sync(&user).await;
            matches!(member, Ok(Some(m)) if *m.membership() == MembershipState::Join)
        })
        .await
    }
}

/// Adds a received message unless it is there already (sync and history both report).
fn record(sink: &Mutex<Vec<Received>>, message: Received) {
    let mut received = sink.lock().expect("received");
    if !received.iter().any(|m| m.event_id == message.event_id) {
        received.push(message);
    }
}

impl Drop for EncryptedPeer {
    fn drop(&mut self) {
        self.sync.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault_proxy::FaultProxy;

    const WITHIN: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn users_talk_in_a_room_and_read_it_back_in_order() {
        let Some(hs) = crate::synapse::require!() else {
            return;
        };
        let started = Instant::now();
        let (alice, bob) = tokio::join!(hs.register("alice"), hs.register("bob"));
        eprintln!("registered 2 users in {:?}", started.elapsed());
        assert_ne!(alice.user_id, bob.user_id);
        assert_eq!(alice.whoami().await, alice.user_id);
        assert!(alice.user_id.starts_with("@alice-") && alice.user_id.ends_with(":localhost"));

        let room = alice.create_room(&[], false).await;
        alice.invite(&room, &bob.user_id).await;
        bob.join(&room).await;
        alice.wait_joined(&room, &bob.user_id, WITHIN).await;
        let mut members = vec![alice.user_id.clone(), bob.user_id.clone()];
        members.sort();
        assert_eq!(alice.joined_members(&room).await, members);

        let mut sent = Vec::new();
        for i in 0..5 {
            let from = if i % 2 == 0 { &alice } else { &bob };
            sent.push((from.send_text(&room, &format!("text {i}")).await, from));
        }
        let reaction = bob.send_reaction(&room, &sent[0].0, "👍").await;

        let messages = bob.messages(&room, 20).await;
        let texts: Vec<_> = messages
            .iter()
            .filter(|m| m.kind == "m.room.message")
            .collect();
        assert_eq!(texts.len(), 5, "{messages:#?}");
        for (i, (m, (event_id, from))) in texts.iter().zip(&sent).enumerate() {
            assert_eq!(&m.event_id, event_id);
            assert_eq!(m.sender, from.user_id);
            assert_eq!(m.body.as_deref(), Some(format!("text {i}").as_str()));
            assert_eq!(m.msgtype.as_deref(), Some("m.text"));
            assert!(!m.is_encrypted());
        }
        let last = messages.last().expect("the reaction");
        assert_eq!(last.event_id, reaction);
        assert_eq!(last.reaction(), Some((sent[0].0.as_str(), "👍")));
        let seen = alice
            .wait_for_message(&room, |m| m.reaction().is_some(), WITHIN)
            .await;
        assert_eq!(seen.event_id, reaction);

        // A direct chat: the invite says so, the room is encrypted, and it is in m.direct.
        let dm = alice.create_dm(&bob.user_id, true).await;
        let state = |kind: &'static str, key: &str| {
            let path = ["rooms", dm.as_str(), "state", kind, key].map(str::to_string);
            let alice = alice.clone();
            async move {
                let path: Vec<&str> = path.iter().map(String::as_str).collect();
                let (status, content) = alice
                    .api(Method::GET, &path, &[], None, None)
                    .await
                    .expect("state");
                assert_eq!(status, 200, "{content}");
                content
            }
        };
        let invite = state("m.room.member", &bob.user_id).await;
        assert_eq!(invite["membership"], "invite");
        assert_eq!(invite["is_direct"], true);
        let encryption = state("m.room.encryption", "").await;
        assert_eq!(encryption["algorithm"], "m.megolm.v1.aes-sha2");
        let path = ["user", alice.user_id.as_str(), "account_data", "m.direct"];
        let (_, direct) = alice
            .api(Method::GET, &path, &[], None, None)
            .await
            .expect("m.direct");
        assert_eq!(direct[&bob.user_id], json!([dm]));
        bob.join(&dm).await;
        alice.wait_joined(&dm, &bob.user_id, WITHIN).await;
        bob.leave(&dm).await;
        assert_eq!(alice.joined_members(&dm).await, [alice.user_id.as_str()]);
    }

    #[tokio::test]
    async fn parallel_registrations_get_distinct_users() {
        let Some(hs) = require!() else { return };
        let started = Instant::now();
        let users = futures_util::future::join_all((0..8).map(|_| hs.register("Many.Users"))).await;
        eprintln!("registered 8 users at once in {:?}", started.elapsed());
        let mut ids: Vec<_> = users.iter().map(|u| u.user_id.clone()).collect();
        assert!(
            ids.iter().all(|id| id.starts_with("@many.users-")),
            "{ids:?}"
        );
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 8);
        // A fresh login is another device with a working token.
        let (token, device) = users[0].login_fresh().await;
        assert_ne!(device, users[0].device_id);
        assert_eq!(
            users[0].whoami_with(&token).await,
            Ok(users[0].user_id.clone())
        );
        users[0].logout(&token).await;
        assert_eq!(users[0].whoami_with(&token).await, Err(401));
        assert_eq!(
            users[0].whoami().await,
            users[0].user_id,
            "the other device"
        );
    }

    #[tokio::test]
    async fn a_private_synapse_stops_and_comes_back_at_the_same_url() {
        let Some(_) = require!() else { return };
        let started = Instant::now();
        let hs = Synapse::start_private("restart").await;
        eprintln!("private Synapse started in {:?}", started.elapsed());
        let user = hs.register("restart").await;
        user.login_fresh().await;

        hs.stop().await;
        let refused = reqwest::get(format!("{}/_matrix/client/versions", hs.url())).await;
        let err = refused.expect_err("a stopped Synapse answered");
        assert!(err.is_connect(), "not a refused connection: {err}");
        assert!(user.try_login().await.is_err());

        let started = Instant::now();
        hs.start_again().await;
        eprintln!("private Synapse restarted in {:?}", started.elapsed());
        assert_eq!(
            std::fs::read_to_string(hs.dir().join("url"))
                .expect("url")
                .trim(),
            hs.url()
        );
        let (token, _) = user.login_fresh().await;
        assert_eq!(user.whoami_with(&token).await, Ok(user.user_id.clone()));
        assert_eq!(
            user.whoami().await,
            user.user_id,
            "tokens survive a restart"
        );
    }

    #[tokio::test]
    async fn encrypted_peers_exchange_a_message_only_they_can_read() {
        let Some(hs) = require!() else { return };
        let (a, b) = tokio::join!(hs.register("peer-a"), hs.register("peer-b"));
        let started = Instant::now();
        let (pa, pb) = tokio::join!(EncryptedPeer::login(&a), EncryptedPeer::login(&b));
        eprintln!(
            "2 encrypted peers logged in and synced in {:?}",
            started.elapsed()
        );
        assert_eq!(pa.user_id(), a.user_id);
        assert_ne!(pa.device_id(), a.device_id, "a new device");

        let room = pa.create_encrypted_room(&[&b.user_id]).await;
        pb.join(&room).await;
        pa.wait_joined(&room, &b.user_id, WITHIN).await;
        let started = Instant::now();
        let event_id = pa.send_text(&room, "hello-e2ee").await;
        let got = pb
            .wait_for_message(&room, |m| m.sender == a.user_id, WITHIN)
            .await;
        eprintln!("encrypted message delivered in {:?}", started.elapsed());
        assert_eq!(got.body, "hello-e2ee");
        assert_eq!(got.event_id, event_id);
        assert!(got.encrypted, "received in clear: {got:?}");

        // The server holds only ciphertext.
        let raw = b.messages(&room, 10).await;
        let stored = raw
            .iter()
            .find(|m| m.event_id == event_id)
            .expect("the event on the server");
        assert!(stored.is_encrypted(), "{stored:?}");
        assert_eq!(stored.body, None);
        assert_eq!(stored.content["algorithm"], "m.megolm.v1.aes-sha2");
        assert!(!stored.content.to_string().contains("hello-e2ee"));

        // And back the other way.
        let reply = pb.send_text(&room, "hello back").await;
        let text = pa
            .wait_for_text(&room, |sender, _| sender == b.user_id, WITHIN)
            .await;
        assert_eq!(text, "hello back");
        assert!(
            b.messages(&room, 10)
                .await
                .iter()
                .any(|m| m.event_id == reply && m.is_encrypted())
        );

        // An encrypted direct chat, started by the other side.
        let dm = pb.create_encrypted_dm(&a.user_id).await;
        pa.join(&dm).await;
        pb.wait_joined(&dm, &a.user_id, WITHIN).await;
        pb.send_text(&dm, "psst").await;
        let got = pa
            .wait_for_message(&dm, |m| m.sender == b.user_id, WITHIN)
            .await;
        assert_eq!((got.body.as_str(), got.encrypted), ("psst", true));
    }

    #[tokio::test]
    async fn the_fault_proxy_counts_concurrent_logins() {
        let Some(hs) = require!() else { return };
        let user = hs.register("logins").await;
        let proxy = FaultProxy::start(hs.addr()).await.expect("proxy");
        let through = user.via(&format!("http://{}", proxy.addr()));
        // One after the other: never two at once.
        for _ in 0..2 {
            through.login_fresh().await;
        }
        assert_eq!(proxy.peak_in_flight("/login"), 1);
        // Six at once (on six connections): more than one at once, at most six.
        futures_util::future::join_all((0..6).map(|_| through.login_fresh())).await;
        assert_eq!(proxy.count("/login"), 8);
        assert_eq!(proxy.in_flight("/login"), 0);
        let peak = proxy.peak_in_flight("/login");
        assert!((2..=6).contains(&peak), "peak {peak}");
        assert_eq!(proxy.peak_in_flight("/whoami"), 0);
    }
}
