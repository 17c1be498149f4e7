//! Integration test: `wss://` through a TLS terminator in front of a real gateway.
//!
//! The certificates are made at test time with the `openssl` command (a CA, and a server
//! certificate for `127.0.0.1` signed by it); the terminator is tokio-rustls, forwarding
//! each connection to the plain `ws://` listener of a `warden run` process. `warden call`
//! and `warden node` run as real processes, trusting the test CA only through
//! `SSL_CERT_FILE`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::support::{Launch, TempDir, connected_nodes, eventually, free_port, node_config};

const TOKEN: &str = "tls-test-token";

/// Runs `openssl ARGS` in `dir`; fails the test with its stderr if it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect(
            "the openssl command (Debian: apt-get install openssl) makes the test certificates",
        );
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `ca.pem` (a CA) and `server.pem` / `server.key` (a certificate for 127.0.0.1
/// signed by it) into `dir`. Returns the path of `ca.pem`.
fn make_certificates(dir: &Path) -> PathBuf {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=warden test CA"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(dir, &ca);
    let mut csr = vec!["req", "-subj", "/CN=127.0.0.1"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName = IP:127.0.0.1\nbasicConstraints = critical, CA:FALSE\n\
         extendedKeyUsage = serverAuth\n",
    )
    .expect("write server.ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
    );
    dir.join("ca.pem")
}

/// A TLS terminator on 127.0.0.1: each connection is TLS-accepted with the certificate in
/// `dir` and forwarded to `upstream` as plain TCP. Its tasks end when it is dropped.
struct Terminator {
    addr: String,
    /// Handshakes completed and failed.
    handshakes: Arc<(AtomicUsize, AtomicUsize)>,
    /// The accept loop and the connections it forwards; aborted on drop.
    _tasks: JoinSet<()>,
}

impl Terminator {
    async fn start(dir: &Path, upstream: String) -> Self {
        let certs = CertificateDer::pem_file_iter(dir.join("server.pem"))
            .expect("server.pem")
            .collect::<Result<Vec<_>, _>>()
            .expect("server.pem certificates");
        let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).expect("server.key");
        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server certificate");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let handshakes = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
        let counts = handshakes.clone();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, upstream, counts) =
                    (acceptor.clone(), upstream.clone(), counts.clone());
                connections.spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        counts.1.fetch_add(1, Ordering::SeqCst);
                        return;
                    };
                    counts.0.fetch_add(1, Ordering::SeqCst);
                    if let Ok(mut plain) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    }
                });
            }
        });
        Self {
            addr,
            handshakes,
            _tasks: tasks,
        }
    }

    fn completed(&self) -> usize {
        self.handshakes.0.load(Ordering::SeqCst)
    }

    fn failed(&self) -> usize {
        self.handshakes.1.load(Ordering::SeqCst)
    }
}

/// `warden call METHOD --gateway URL` with `envs`, the outer `SSL_CERT_*` removed;
/// returns (exit code, stdout, stderr).
async fn warden_call(
    name: &str,
    url: &str,
    method: &str,
    params: &str,
    envs: &[(&str, &str)],
) -> (i32, String, String) {
    let args = ["call", method, "--gateway", url, "--params", params];
    let out = Launch::new(name, &args)
        .env("WARDEN_GATEWAY__TOKEN", TOKEN)
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
        .envs(envs)
        .output(Duration::from_secs(30))
        .await;
    (
        out.status.code().expect("exited, not signalled"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_call_and_node_through_a_tls_terminator_trust_only_ssl_cert_file() {
    let certs = TempDir::new("tls-certs");
    let ca = make_certificates(certs.path());
    let ca = ca.to_str().expect("UTF-8 path");

    let gateway = format!("127.0.0.1:{}", free_port());
    let plain_url = format!("ws://{gateway}/ws");
    let gw = Launch::run("tls-gw")
        .gateway_bind(&gateway)
        .env("WARDEN_GATEWAY__TOKEN", TOKEN)
        .env("WARDEN_GATEWAY__ALLOW_UNLISTED_NODES", "true")
        .spawn();
    gw.ready().await;
    let tls = Terminator::start(certs.path(), gateway.clone()).await;
    let url = format!("wss://{}/ws", tls.addr);

    // Trusted through SSL_CERT_FILE: the call succeeds, over a completed handshake.
    let (code, stdout, stderr) = warden_call(
        "tls-call-ok",
        &url,
        "health",
        "{}",
        &[("SSL_CERT_FILE", ca)],
    )
    .await;
    assert_eq!(code, 0, "stderr: {stderr}");
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).expect("JSON"),
        json!({"status": "ok"})
    );
    assert_eq!((tls.completed(), tls.failed()), (1, 0));

    // Without it only the system's roots are trusted: a certificate error, at once.
    let (code, stdout, stderr) = warden_call("tls-call-untrusted", &url, "health", "{}", &[]).await;
    assert_eq!((code, stdout.as_str()), (1, ""), "stderr: {stderr}");
    assert_eq!(
        stderr,
        format!(
            "warden: cannot connect to {url}: TLS: invalid peer certificate: UnknownIssuer; \
             the gateway's certificate must chain to a CA in the system store, or in \
             SSL_CERT_FILE / SSL_CERT_DIR when set\n"
        )
    );
    assert_eq!(
        (tls.completed(), tls.failed()),
        (1, 1),
        "one attempt, not retried"
    );

    // Roots that cannot be read: said so, and nothing is sent.
    let missing = certs.join("missing.pem");
    let missing = missing.to_str().expect("UTF-8 path");
    let (code, _, stderr) = warden_call(
        "tls-call-noroots",
        &url,
        "health",
        "{}",
        &[("SSL_CERT_FILE", missing)],
    )
    .await;
    assert_eq!(code, 1, "stderr: {stderr}");
    assert!(
        stderr.starts_with(&format!(
            "warden: cannot connect to {url}: TLS: no CA certificates to check the gateway's \
             certificate with ("
        )) && stderr.contains(missing)
            && stderr.ends_with(
                "install the system's CA bundle (Debian: ca-certificates) or set \
                 SSL_CERT_FILE to a PEM file\n"
            ),
        "{stderr}"
    );
    assert_eq!(
        (tls.completed(), tls.failed()),
        (1, 1),
        "no connection made"
    );

    // `warden node` with gateway_url = "wss://…" connects and runs a command.
    let config = format!(
        "{}[node.commands.hello]\nargv = [\"echo\", \"hello over tls\"]\n",
        node_config(&url, TOKEN, "tls-box")
    );
    let node = Launch::node("tls-node", &config)
        .env("SSL_CERT_FILE", ca)
        .spawn();
    let what = node.with_logs("node tls-box connected");
    eventually(Duration::from_secs(20), what, async || {
        let nodes = connected_nodes(&plain_url, TOKEN).await;
        if nodes == ["tls-box"] {
            Ok(())
        } else {
            Err(format!("{nodes:?}"))
        }
    })
    .await;
    let params = r#"{"node":"tls-box","command":"hello"}"#;
    let (code, stdout, stderr) = warden_call(
        "tls-call-invoke",
        &url,
        "nodes.invoke",
        params,
        &[("SSL_CERT_FILE", ca)],
    )
    .await;
    assert_eq!(code, 0, "stderr: {stderr}");
    let out: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(
        (out["exit_code"].as_i64(), out["stdout"].as_str()),
        (Some(0), Some("hello over tls\n"))
    );
    assert_eq!(tls.failed(), 1, "node and calls all trusted the test CA");
    drop(node);
    drop(gw);
}
