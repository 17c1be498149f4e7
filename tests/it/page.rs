//! The admin page (issue 13) in a real browser: headless Chromium, driven over WebDriver
//! ([`crate::webdriver`]), against a `warden run` whose admin endpoint has a token.
//!
//! The page (`/`, `/page.js`, `/page.css`) is served without the token, under a strict
//! Content-Security-Policy, and carries no data. Opened without a token, it asks for one;
//! given it, it shows the live tree, follows a restart made elsewhere within 2 s without a
//! reload, and restarts a child from its button once the in-page confirmation says yes.
//! One test, in phases: a browser takes a second to start.
//!
//! Skipped without chromium and chromedriver outside CI; under `CI=true` a missing one
//! fails. A screenshot of the tree is left at `target/page-test/tree.png`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Launch, eventually, tree_node};
use crate::webdriver::{self, Browser};

/// The admin token of the warden under test.
const TOKEN: &str = "page-admin-token-5d1f";

/// The child the test kills and restarts.
const LISTENER: &str = "root/gateway/listener";

/// The policy the three page routes answer with.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// How long the page may take to show a change (it polls every 500 ms).
const SHOWN_WITHIN: Duration = Duration::from_secs(2);

/// How long anything else may take.
const DEADLINE: Duration = Duration::from_secs(10);

/// The CSS selector of the element of class `class` in the row of the node at `path`.
fn field(path: &str, class: &str) -> String {
    format!(".node[data-path=\"{path}\"] .{class}")
}

/// The CSS selector of the button of `action` in the row of the node at `path`.
fn button(path: &str, action: &str) -> String {
    format!(".node[data-path=\"{path}\"] button.action[data-action=\"{action}\"]")
}

/// The number the page shows in the element `css`.
async fn shown_number(browser: &Browser, css: &str) -> anyhow::Result<u64> {
    let text = browser.text_of(css).await?;
    text.parse()
        .with_context(|| format!("{css} shows {text:?}, not a number"))
}

/// The generation of the node at `path`, as `GET /admin/tree` (with the token) has it.
async fn tree_generation(http: &reqwest::Client, admin: &str, path: &str) -> anyhow::Result<u64> {
    let response = http
        .get(format!("{admin}/admin/tree"))
        .bearer_auth(TOKEN)
        .send()
        .await?;
    ensure!(
        response.status() == StatusCode::OK,
        "GET /admin/tree: {}",
        response.status()
    );
    let tree: Value = response.json().await?;
    tree_node(&tree, path)
        .and_then(|node| node["generation"].as_u64())
        .with_context(|| format!("no generation of {path} in {tree}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_page_shows_the_live_tree_and_acts_on_it() -> anyhow::Result<()> {
    let Some(tools) = webdriver::tools()? else {
        return Ok(());
    };
    let warden = Launch::run("page")
        .env("WARDEN_ADMIN__TOKEN", TOKEN)
        .spawn();
    let admin = warden.ready().await;
    let http = reqwest::Client::builder().timeout(DEADLINE).build()?;

    // The page: no token needed, the policy on each part, no data in it.
    for (path, content_type) in [
        ("/", "text/html"),
        ("/page.js", "javascript"),
        ("/page.css", "text/css"),
    ] {
        let response = http.get(format!("{admin}{path}")).send().await?;
        let header = |name: &str| {
            let value = response.headers().get(name);
            value
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let (csp, got_type) = (header("content-security-policy"), header("content-type"));
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        assert_eq!(csp, CSP, "GET {path}: the Content-Security-Policy");
        assert!(got_type.contains(content_type), "GET {path}: {got_type}");
        let body = response.text().await?;
        if path == "/" {
            assert!(
                !body.contains("root/") && !body.contains("gateway"),
                "GET / carries tree data:\n{body}"
            );
            // The policy forbids inline code and style: the page must not need them.
            assert!(
                !body.contains("<script>") && !body.contains("<style") && !body.contains(" style="),
                "GET / has inline script or style:\n{body}"
            );
        }
    }
    // Its data routes are guarded like every other admin route.
    for (method, path) in [
        ("GET", "/admin/tree"),
        ("GET", "/admin/config"),
        ("POST", "/admin/actors/root/gateway/listener/restart"),
    ] {
        let url = format!("{admin}{path}");
        let request = match method {
            "GET" => http.get(url),
            _ => http.post(url),
        };
        let response = request.send().await?;
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{method} {path}"
        );
        let body: Value = response.json().await?;
        assert_eq!(
            body["error"]["code"], "unauthorized",
            "{method} {path}: {body}"
        );
    }

    // Opened without a token, the page asks for it and shows nothing else.
    let browser = Browser::start(&tools).await?;
    browser.goto(&format!("{admin}/")).await?;
    let check = async || -> anyhow::Result<()> {
        let asked = browser.text_of("#auth-needed").await?;
        ensure!(
            asked.contains("admin token"),
            "#auth-needed shows {asked:?}"
        );
        Ok(())
    };
    browser
        .wait_for("the page asks for the admin token", DEADLINE, check)
        .await;
    assert_eq!(
        browser.find(".node").await?,
        None,
        "a tree without the token"
    );

    // Given the token, it shows the tree: the listener running, the whole tree ready.
    let input = browser.get("#token-input").await?;
    browser.send_keys(&input, TOKEN).await?;
    browser.click(&browser.get("#token-save").await?).await?;
    let check = async || -> anyhow::Result<()> {
        let state = browser.text_of(&field(LISTENER, "state")).await?;
        let readiness = browser.text_of("#readiness").await?;
        ensure!(
            (state.as_str(), readiness.as_str()) == ("running", "ready"),
            "{LISTENER} {state:?}, readiness {readiness:?}"
        );
        Ok(())
    };
    browser
        .wait_for(format!("{LISTENER} shown running"), DEADLINE, check)
        .await;
    assert_eq!(browser.text_of("#auth-needed").await?, "", "still asking");
    // The running config's generation, from the tree's `config`.
    let config = browser.text_of("#config-generation").await?;
    assert!(
        config.starts_with("config generation 1, applied "),
        "{config:?}"
    );
    // page.css applies under the policy: a state has its colour (and its text).
    let colour = browser
        .execute(
            "return getComputedStyle(document.querySelector(arguments[0])).backgroundColor",
            &[json!(field(LISTENER, "state"))],
        )
        .await?;
    assert_ne!(colour, "rgba(0, 0, 0, 0)", "no style on the state");
    let screenshot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/page-test/tree.png");
    browser.screenshot(&screenshot).await?;
    eprintln!("screenshot of the admin page: {}", screenshot.display());

    // A kill sent elsewhere shows as a restart within 2 s, without a reload.
    let before = shown_number(&browser, &field(LISTENER, "generation")).await?;
    browser
        .execute("window.wardenTest = 'not reloaded'", &[])
        .await?;
    let response = http
        .post(format!("{admin}/admin/actors/{LISTENER}/kill"))
        .bearer_auth(TOKEN)
        .send()
        .await?;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "{:?}",
        response.text().await
    );
    let check = async || -> anyhow::Result<u64> {
        let generation = shown_number(&browser, &field(LISTENER, "generation")).await?;
        ensure!(
            generation > before,
            "generation {generation}, {before} before the kill"
        );
        Ok(generation)
    };
    browser
        .wait_for("the page shows the restart", SHOWN_WITHIN, check)
        .await;
    let failure = browser.text_of(&field(LISTENER, "last-failure")).await?;
    assert!(
        failure.contains("transient: killed by operator"),
        "{failure}"
    );
    assert!(shown_number(&browser, &field(LISTENER, "restarts")).await? >= 1);
    let marker = browser.execute("return window.wardenTest", &[]).await?;
    assert_eq!(marker, "not reloaded", "the page was reloaded");

    // A button asks first; cancelled, it sends nothing.
    browser
        .click(&browser.get(&button(LISTENER, "kill")).await?)
        .await?;
    let confirm = browser.text_of("#confirm").await?;
    assert!(confirm.contains(&format!("kill {LISTENER}")), "{confirm}");
    browser.click(&browser.get("#confirm-no").await?).await?;
    assert_eq!(
        browser.text_of("#confirm").await?,
        "",
        "the confirmation stays open"
    );
    assert_eq!(browser.text_of("#status-line").await?, "", "sent anyway");

    // Confirmed, the restart button restarts the child.
    let before = tree_generation(&http, &admin, LISTENER).await?;
    browser
        .click(&browser.get(&button(LISTENER, "restart")).await?)
        .await?;
    let confirm = browser.text_of("#confirm").await?;
    assert!(
        confirm.contains(&format!("restart {LISTENER}")),
        "{confirm}"
    );
    browser.click(&browser.get("#confirm-yes").await?).await?;
    let check = async || -> anyhow::Result<()> {
        let status = browser.text_of("#status-line").await?;
        ensure!(status == format!("restart {LISTENER}: done"), "{status:?}");
        Ok(())
    };
    browser
        .wait_for("the status line says the restart is done", DEADLINE, check)
        .await;
    let restarted = format!("{LISTENER} restarted from the page");
    eventually(DEADLINE, restarted, async || -> anyhow::Result<()> {
        let generation = tree_generation(&http, &admin, LISTENER).await?;
        ensure!(
            generation > before,
            "generation {generation}, {before} before"
        );
        Ok(())
    })
    .await;

    browser.quit().await
}
