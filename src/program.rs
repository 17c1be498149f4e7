//! What `warden run` and `warden node` share: logging and metrics set-up, the admin state,
//! and the wait-then-shut-down-in-order lifecycle with its exit codes.

use std::future::Future;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tracing::{error, info, warn};
use warden_actors::supervision::{ChildSpec, ExitRequest, Tree, TreeOptions};

use crate::admin::{self, AdminState};
use crate::config::{EXIT_CONFIG, Loaded};
use crate::telemetry::{self, Telemetry};

/// The process exit code when the root supervisor died on its own (EX_SOFTWARE).
pub const EXIT_ROOT_DIED: i32 = 70;

/// Logging and metrics of a running program.
pub struct Program {
    telemetry: Telemetry,
    /// The Prometheus recorder, when it could be installed.
    pub metrics: Option<PrometheusHandle>,
}

/// Why a program is ending.
pub enum Stop {
    /// SIGTERM or SIGINT: exit 0 after an ordered shutdown.
    Signal(&'static str),
    /// A child's policy said exit: its code after an ordered shutdown.
    Exit(ExitRequest),
    /// The program's own reason (e.g. a node disconnected too long), with a code.
    Other {
        /// What happened, for the log.
        reason: String,
        /// The exit code.
        code: i32,
    },
    /// The root died: nothing left to shut down.
    RootDied,
}

impl Program {
    /// Sets up logging (errors here happen before logging exists: printed, exit 64) and
    /// the metrics recorder (installed before the tree, so no early metric is lost).
    pub fn start(loaded: &Loaded) -> Result<Program, i32> {
        let telemetry = telemetry::init(&loaded.config.telemetry).map_err(|e| {
            eprintln_line(&format!("warden: {e}"));
            EXIT_CONFIG
        })?;
        raise_open_file_limit();
        let metrics = match admin::install_metrics() {
            Ok(handle) => Some(handle),
            Err(e) => {
                warn!(error = %e, "Metrics are off: cannot install the recorder.");
                None
            }
        };
        Ok(Program { telemetry, metrics })
    }

    /// The admin endpoint's state: the masked config with sources, the token, metrics.
    pub fn admin_state(&self, loaded: &Loaded) -> AdminState {
        let entries: Vec<serde_json::Value> = loaded
            .entries()
            .into_iter()
            .map(|e| json!({ "key": e.key, "value": e.value, "source": e.source }))
            .collect();
        AdminState::new(
            json!({ "entries": entries }),
            loaded.config.admin.token.clone(),
            self.metrics.clone(),
        )
    }

    /// Waits for a signal, an exit request, the root's death or `other`; then runs
    /// `before_shutdown` and shuts the tree down in order within `deadline`. Returns the
    /// process exit code.
    pub async fn serve(
        self,
        tree: Tree,
        deadline: Duration,
        other: impl Future<Output = Stop>,
        before_shutdown: impl FnOnce(),
    ) -> i32 {
        let stop = tokio::select! {
            name = signal() => Stop::Signal(name),
            request = tree.exit().requested() => Stop::Exit(request),
            () = tree.stopped() => Stop::RootDied,
            stop = other => stop,
        };
        let code = match &stop {
            Stop::Signal(name) => {
                info!(signal = name, "Signal received; shutting down.");
                0
            }
            Stop::Exit(request) => {
                error!(actor = %request.path, code = request.code, reason = %request.reason,
                    "A child gave up and its policy says exit; shutting down.");
                request.code
            }
            Stop::Other { reason, code } => {
                error!(code, reason = %reason, "Shutting down.");
                *code
            }
            Stop::RootDied => {
                error!("The root supervisor died; exiting.");
                EXIT_ROOT_DIED
            }
        };
        if !matches!(stop, Stop::RootDied) {
            before_shutdown();
            let report = tree.shutdown(deadline).await;
            if report.graceful {
                info!(code, "Shutdown complete.");
            } else {
                warn!(still_running = ?report.still_running, "Shutdown deadline passed; the rest was killed.");
            }
        }
        self.telemetry.shutdown().await;
        code
    }

    /// Starts the tree and hands it to the admin endpoint; when it cannot start, logs why,
    /// ends logging and returns the exit code (70).
    pub async fn start_tree(
        self,
        children: Vec<ChildSpec>,
        admin: &AdminState,
    ) -> Result<(Program, Tree), i32> {
        match Tree::start(children, TreeOptions::default()).await {
            Ok(tree) => {
                let _ = admin.set_tree(tree.handle());
                Ok((self, tree))
            }
            Err(e) => {
                error!(error = %e, "Cannot start the supervision tree.");
                self.abort().await;
                Err(EXIT_ROOT_DIED)
            }
        }
    }

    /// Ends logging (flushing OTLP within its timeout) when the tree never started.
    pub async fn abort(self) {
        self.telemetry.shutdown().await;
    }
}

/// Waits for SIGTERM or SIGINT; returns its name.
async fn signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        },
        _ => {
            // Without signal handlers only the other stop paths can end the process.
            warn!("Cannot install signal handlers.");
            std::future::pending().await
        }
    }
}

/// For the one error that can happen before logging is set up.
fn eprintln_line(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Raises the soft limit on open files to the hard limit. Each Matrix account holds about
/// 25 descriptors (its SQLite files and connections) and each gateway socket one, so the
/// common soft limit of 1024 runs out at about 40 accounts ("Too many open files").
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "Open-file limit raised to the hard limit."),
        Err(e) => {
            warn!(error = %e, "Cannot raise the open-file limit; many accounts may exhaust it.")
        }
    }
}
