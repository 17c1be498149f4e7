//! What `warden run` and `warden node` share: logging and metrics set-up, the admin state,
//! and the wait-then-shut-down-in-order lifecycle with its exit codes.

use std::future::Future;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::signal::unix::{Signal, SignalKind, signal};
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
    /// SIGTERM and SIGINT, listened to from the start.
    signals: Signals,
    /// SIGHUP, listened to from the start (its default action would end the process).
    hangups: Option<Hangups>,
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
        // Before anything slow: a signal that arrives while the tree starts must not be
        // lost. As process 1 of a container, warden would simply never see a SIGTERM that
        // came before its handler, and the runtime would wait out its grace period.
        let signals = Signals::install();
        let hangups = Some(Hangups::install());
        raise_open_file_limit();
        let metrics = match admin::install_metrics() {
            Ok(handle) => Some(handle),
            Err(e) => {
                warn!(error = %e, "Metrics are off: cannot install the recorder.");
                None
            }
        };
        Ok(Program {
            telemetry,
            signals,
            hangups,
            metrics,
        })
    }

    /// SIGHUPs, for the program that reloads on them (others ignore them). The first call
    /// takes them; a later one gets a stream that never yields.
    pub fn take_hangups(&mut self) -> Hangups {
        self.hangups.take().unwrap_or(Hangups(None))
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
        let Program {
            telemetry,
            mut signals,
            ..
        } = self;
        let stop = tokio::select! {
            name = signals.recv() => Stop::Signal(name),
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
        telemetry.shutdown().await;
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

/// SIGTERM and SIGINT: from [`Signals::install`] on, one that arrives is kept until
/// [`Signals::recv`].
struct Signals(Option<(Signal, Signal)>);

impl Signals {
    /// Installs the handlers (tokio's: the signals are no longer fatal from here on).
    fn install() -> Self {
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Signals(Some((term, int))),
            _ => {
                // Without signal handlers only the other stop paths can end the process.
                warn!("Cannot install signal handlers.");
                Signals(None)
            }
        }
    }

    /// Waits for SIGTERM or SIGINT; returns its name.
    async fn recv(&mut self) -> &'static str {
        match &mut self.0 {
            Some((term, int)) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            },
            None => std::future::pending().await,
        }
    }
}

/// SIGHUP: from [`Hangups::install`] on, its default action (ending the process) is off.
pub struct Hangups(Option<Signal>);

impl Hangups {
    fn install() -> Self {
        match signal(SignalKind::hangup()) {
            Ok(hup) => Hangups(Some(hup)),
            Err(_) => {
                warn!("Cannot install the SIGHUP handler; reload over the admin endpoint.");
                Hangups(None)
            }
        }
    }

    /// Waits for the next SIGHUP.
    pub async fn recv(&mut self) {
        match &mut self.0 {
            Some(hup) => {
                if hup.recv().await.is_none() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Signals;

    /// A SIGTERM that arrives after the handlers are installed but before anyone waits for
    /// it (the tree still starting) is kept for the wait: the reason `Program::start`
    /// installs them first. (The test sends SIGTERM to its own process; tokio's handler,
    /// installed first, keeps that from being fatal.)
    #[tokio::test]
    async fn a_signal_before_the_wait_is_kept_for_it() {
        let mut signals = Signals::install();
        assert!(signals.0.is_some(), "the handlers could not be installed");
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
        let name = tokio::time::timeout(Duration::from_secs(5), signals.recv())
            .await
            .expect("the SIGTERM sent before the wait was lost");
        assert_eq!(name, "SIGTERM");
    }
}
