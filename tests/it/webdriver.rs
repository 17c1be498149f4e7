//! A minimal W3C WebDriver client for the browser tests, on what the package already
//! depends on (reqwest, serde_json, tokio): no WebDriver crate, no base64 crate.
//!
//! * [`tools`] — finds `chromedriver` and `chromium`; `None` (the caller skips; a line says
//!   why) when one is missing, except under `CI=true`, where that is an error naming it.
//! * [`Browser`] — `chromedriver` on a free port, a child process killed on drop, and one
//!   headless Chromium session in it, deleted on [`Browser::quit`] (or on drop). Its
//!   commands are the few the tests use: [`goto`](Browser::goto), [`find`](Browser::find),
//!   [`click`](Browser::click), [`send_keys`](Browser::send_keys),
//!   [`text`](Browser::text), [`execute`](Browser::execute),
//!   [`screenshot`](Browser::screenshot), and [`wait_for`](Browser::wait_for), which
//!   polls a condition with a deadline and shows the page's text when it fails.
//!
//! Every error names the command that failed and what the driver said.

use std::fmt::Display;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::support::{Progress, free_port};

/// Where Debian's `chromium-driver` puts the driver, when it is not on `PATH`.
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Where Debian's `chromium` puts the browser.
const CHROMIUM: &str = "/usr/bin/chromium";

/// Chromium's switches: headless, as root in a container (no sandbox, no `/dev/shm`), one
/// fixed window size so that screenshots compare.
const CHROMIUM_ARGS: [&str; 5] = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
];

/// How long chromedriver may take to answer `/status` ready after it starts.
const DRIVER_START: Duration = Duration::from_secs(10);

/// How long one WebDriver command may take (creating a session starts the browser).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The pause between two checks of [`Browser::wait_for`].
const POLL: Duration = Duration::from_millis(50);

/// The key of an element reference in WebDriver's JSON.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

// ---------------------------------------------------------------------------------------
// Finding the tools
// ---------------------------------------------------------------------------------------

/// The two programs a [`Browser`] runs.
#[derive(Debug, Clone)]
pub(crate) struct Tools {
    /// The WebDriver server.
    pub(crate) chromedriver: PathBuf,
    /// The browser it drives.
    pub(crate) chromium: PathBuf,
}

/// The tools: the file `CHROMEDRIVER` names, else `chromedriver` on `PATH`, else
/// `/usr/bin/chromedriver`; the file `CHROMIUM` names, else `/usr/bin/chromium`, else
/// `chromium` on `PATH`. When one is missing: `None`, after a `skipped:` line naming it (the caller
/// returns), except under `CI=true`, where that is an error naming it.
pub(crate) fn tools() -> anyhow::Result<Option<Tools>> {
    let chromedriver = std::env::var_os("CHROMEDRIVER")
        .map(PathBuf::from)
        .filter(|path| path.is_file())
        .or_else(|| on_path("chromedriver"))
        .or_else(|| existing(CHROMEDRIVER));
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .filter(|path| path.is_file())
        .or_else(|| existing(CHROMIUM))
        .or_else(|| on_path("chromium"));
    match (chromedriver, chromium) {
        (Some(chromedriver), Some(chromium)) => Ok(Some(Tools {
            chromedriver,
            chromium,
        })),
        (chromedriver, chromium) => {
            let mut missing = Vec::new();
            if chromedriver.is_none() {
                missing.push(format!(
                    "chromedriver (not at CHROMEDRIVER, on PATH or {CHROMEDRIVER})"
                ));
            }
            if chromium.is_none() {
                missing.push(format!("chromium (not at CHROMIUM, {CHROMIUM} or on PATH)"));
            }
            let missing = missing.join(" and ");
            anyhow::ensure!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but {missing} missing: install the chromium and chromium-driver packages"
            );
            eprintln!("skipped: {missing} missing (apt-get install chromium chromium-driver)");
            Ok(None)
        }
    }
}

/// `path`, if a file is there.
fn existing(path: &str) -> Option<PathBuf> {
    let path = PathBuf::from(path);
    path.is_file().then_some(path)
}

/// The first file named `name` in a directory of `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    let dirs = std::env::var_os("PATH")?;
    std::env::split_paths(&dirs)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

// ---------------------------------------------------------------------------------------
// The browser
// ---------------------------------------------------------------------------------------

/// An element of the page, as WebDriver names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Element(String);

/// chromedriver and one headless Chromium session in it. Dropped without
/// [`quit`](Browser::quit), it deletes the session (blocking briefly, so that Chromium
/// does not outlive the test), then kills chromedriver.
pub(crate) struct Browser {
    http: reqwest::Client,
    /// chromedriver's port on 127.0.0.1.
    port: u16,
    /// The session's id.
    session: String,
    /// chromedriver; killed when dropped.
    _driver: Child,
    /// Whether the session was deleted already.
    quit: bool,
}

impl Browser {
    /// Starts chromedriver on a free port, waits until it answers `/status` ready, and
    /// opens a headless Chromium session.
    pub(crate) async fn start(tools: &Tools) -> anyhow::Result<Self> {
        let port = free_port();
        let mut driver = Command::new(&tools.chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run {}", tools.chromedriver.display()))?;
        let http = reqwest::Client::builder()
            .timeout(COMMAND_TIMEOUT)
            .no_proxy()
            .build()?;
        let status = format!("http://127.0.0.1:{port}/status");
        let until = Instant::now() + DRIVER_START;
        loop {
            if let Some(exit) = driver.try_wait()? {
                bail!(
                    "{} --port={port} exited before it was ready: {exit}",
                    tools.chromedriver.display()
                );
            }
            let ready = match http.get(&status).send().await {
                Ok(response) => response.json::<Value>().await.ok(),
                Err(_) => None,
            };
            if ready.is_some_and(|r| r["value"]["ready"] == true) {
                break;
            }
            if Instant::now() >= until {
                bail!(
                    "{} --port={port} did not answer {status} ready within {DRIVER_START:?}",
                    tools.chromedriver.display()
                );
            }
            tokio::time::sleep(POLL).await;
        }
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": { "binary": tools.chromium, "args": CHROMIUM_ARGS },
            } }
        });
        let url = format!("http://127.0.0.1:{port}/session");
        let session = send(&http, Method::POST, &url, Some(capabilities))
            .await
            .with_context(|| {
                format!(
                    "new session: chromedriver could not start {}",
                    tools.chromium.display()
                )
            })?;
        let session = session["sessionId"]
            .as_str()
            .with_context(|| format!("new session: no sessionId in {session}"))?
            .to_string();
        Ok(Self {
            http,
            port,
            session,
            _driver: driver,
            quit: false,
        })
    }

    /// Runs the session's command `method path` (`path` after `/session/{id}`) with
    /// `body`; returns its `value`.
    async fn command(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!(
            "http://127.0.0.1:{}/session/{}{path}",
            self.port, self.session
        );
        send(&self.http, method.clone(), &url, body)
            .await
            .with_context(|| format!("WebDriver {method} {path}"))
    }

    /// Loads `url` and waits until it has loaded.
    pub(crate) async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.command(Method::POST, "/url", Some(json!({ "url": url })))
            .await
            .with_context(|| format!("go to {url}"))?;
        Ok(())
    }

    /// The first element matching the CSS selector `css`, `None` while there is none.
    pub(crate) async fn find(&self, css: &str) -> anyhow::Result<Option<Element>> {
        let body = json!({ "using": "css selector", "value": css });
        let url = format!(
            "http://127.0.0.1:{}/session/{}/element",
            self.port, self.session
        );
        let found = match send_raw(&self.http, Method::POST, &url, Some(body)).await? {
            Ok(value) => value,
            Err(error) if error.code == "no such element" => return Ok(None),
            Err(error) => bail!("find {css:?}: {error}"),
        };
        let id = found[ELEMENT_KEY]
            .as_str()
            .with_context(|| format!("find {css:?}: no element reference in {found}"))?;
        Ok(Some(Element(id.to_string())))
    }

    /// The first element matching `css`; an error naming `css` while there is none.
    pub(crate) async fn get(&self, css: &str) -> anyhow::Result<Element> {
        self.find(css)
            .await?
            .with_context(|| format!("no element matches {css:?}"))
    }

    /// Clicks `element` (scrolled into view; an error if something covers it).
    pub(crate) async fn click(&self, element: &Element) -> anyhow::Result<()> {
        let path = format!("/element/{}/click", element.0);
        self.command(Method::POST, &path, Some(json!({}))).await?;
        Ok(())
    }

    /// Types `text` into `element`.
    pub(crate) async fn send_keys(&self, element: &Element, text: &str) -> anyhow::Result<()> {
        let path = format!("/element/{}/value", element.0);
        self.command(Method::POST, &path, Some(json!({ "text": text })))
            .await?;
        Ok(())
    }

    /// The rendered text of `element`: empty when it is hidden.
    pub(crate) async fn text(&self, element: &Element) -> anyhow::Result<String> {
        let path = format!("/element/{}/text", element.0);
        let text = self.command(Method::GET, &path, None).await?;
        text.as_str()
            .map(str::to_string)
            .with_context(|| format!("the text of an element: not a string: {text}"))
    }

    /// The rendered text of the first element matching `css`; an error while there is
    /// none (a "not yet" for [`Browser::wait_for`]).
    pub(crate) async fn text_of(&self, css: &str) -> anyhow::Result<String> {
        let element = self.get(css).await?;
        self.text(&element).await
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) in the page; returns
    /// what it returns.
    pub(crate) async fn execute(&self, script: &str, args: &[Value]) -> anyhow::Result<Value> {
        let body = json!({ "script": script, "args": args });
        self.command(Method::POST, "/execute/sync", Some(body))
            .await
            .with_context(|| format!("the script {script:?}"))
    }

    /// Saves a PNG screenshot of the window to `path`, creating its directory.
    pub(crate) async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        let encoded = self.command(Method::GET, "/screenshot", None).await?;
        let encoded = encoded
            .as_str()
            .context("screenshot: the answer is not a string")?;
        let png = decode_base64(encoded).context("screenshot: not base64")?;
        anyhow::ensure!(
            png.starts_with(b"\x89PNG\r\n\x1a\n"),
            "screenshot: not a PNG"
        );
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        std::fs::write(path, png).with_context(|| format!("write {}", path.display()))
    }

    /// Checks `check` every 50 ms until it is done, and returns what it returned; panics
    /// naming `what`, with what the last check saw and the page's text, when it is not done
    /// within `deadline`. Checks answer a [`Progress`], as those of
    /// [`eventually`](crate::support::eventually) do: a WebDriver error is a "not yet".
    pub(crate) async fn wait_for<P: Progress>(
        &self,
        what: impl Display,
        deadline: Duration,
        mut check: impl AsyncFnMut() -> P,
    ) -> P::Done {
        let until = Instant::now() + deadline;
        loop {
            let seen = match check().await.progress() {
                Ok(done) => return done,
                Err(seen) => seen,
            };
            let now = Instant::now();
            if now >= until {
                let page = match self.execute("return document.body.innerText", &[]).await {
                    Ok(Value::String(text)) => text,
                    Ok(other) => other.to_string(),
                    Err(e) => format!("<unreadable: {e:#}>"),
                };
                panic!(
                    "not within {deadline:?} in the browser: {what}\nlast seen: {seen}\n\
                     the page's text:\n{page}"
                );
            }
            tokio::time::sleep(POLL.min(until - now)).await;
        }
    }

    /// Deletes the session (Chromium quits), then kills chromedriver.
    pub(crate) async fn quit(mut self) -> anyhow::Result<()> {
        self.quit = true;
        self.command(Method::DELETE, "", None).await?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.quit {
            delete_session_blocking(self.port, &self.session);
        }
    }
}

/// `DELETE /session/{id}` on a plain socket, for [`Drop`], where nothing can be awaited;
/// best effort: a driver that does not answer is killed anyway.
fn delete_session_blocking(port: u16, session: &str) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return;
    };
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let request = format!(
        "DELETE /session/{session} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_ok() {
        // The answer starts once Chromium has quit; the driver may keep the connection
        // open after it, so its first bytes are enough.
        let _ = stream.read(&mut [0; 512]);
    }
}

// ---------------------------------------------------------------------------------------
// The wire
// ---------------------------------------------------------------------------------------

/// A WebDriver error answer: its `error` code and `message`.
#[derive(Debug)]
struct DriverError {
    status: u16,
    code: String,
    message: String,
}

impl Display for DriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Chromium's messages go on with a long stack trace after their first line.
        let first = self.message.lines().next().unwrap_or_default();
        write!(f, "{} ({}): {first}", self.code, self.status)
    }
}

/// Sends one WebDriver request; returns the answer's `value`, or the driver's error.
async fn send_raw(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    body: Option<Value>,
) -> anyhow::Result<Result<Value, DriverError>> {
    let mut request = http.request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .with_context(|| format!("{url}: no answer"))?;
    let mut answer: Value = serde_json::from_str(&text)
        .with_context(|| format!("{url}: {status}, not JSON: {text}"))?;
    let value = answer["value"].take();
    if status.is_success() {
        return Ok(Ok(value));
    }
    Ok(Err(DriverError {
        status: status.as_u16(),
        code: value["error"]
            .as_str()
            .unwrap_or("unknown error")
            .to_string(),
        message: value["message"].as_str().unwrap_or_default().to_string(),
    }))
}

/// [`send_raw`], with the driver's error as an error.
async fn send(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    send_raw(http, method, url, body)
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Decodes standard base64 (RFC 4648, `+/`, padded or not; whitespace ignored).
fn decode_base64(text: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut bits, mut count) = (0u32, 0u32);
    for byte in text.bytes().filter(|b| !b.is_ascii_whitespace()) {
        let sextet = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            other => bail!("the byte {other:#04x} is not base64"),
        };
        bits = (bits << 6) | u32::from(sextet);
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    Ok(out)
}

#[test]
fn base64_decodes_the_rfc_4648_vectors() {
    for (encoded, plain) in [
        ("", ""),
        ("Zg==", "f"),
        ("Zm8=", "fo"),
        ("Zm9v", "foo"),
        ("Zm9vYg==", "foob"),
        ("Zm9vYmE=", "fooba"),
        ("Zm9vYmFy", "foobar"),
        ("Zm9v\nYmFy", "foobar"),
    ] {
        assert_eq!(
            decode_base64(encoded).expect("base64"),
            plain.as_bytes(),
            "{encoded}"
        );
    }
    assert_eq!(
        decode_base64("iVBORw0KGgo=").expect("base64"),
        b"\x89PNG\r\n\x1a\n"
    );
    assert_eq!(decode_base64("+/+/").expect("base64"), [0xfb, 0xff, 0xbf]);
    assert!(decode_base64("Zm9v!").is_err());
}
